"""What the command-line entry points share: a mistake in what the user asked
for ends the program with one line saying what is wrong and exit status 1,
not a traceback through JAX, orbax or ml_collections.

Two kinds of mistake are caught:
* on the command line, while absl parses it: a misspelt or mistyped
  `--config.FIELD=VALUE` override, a config file that does not load, an
  unknown `--config=FILE:ARG` (`parse_flags`);
* while running: a `UserError` (an invalid config field, a bad export, an
  input the tools refuse), whose message names what is wrong and how to fix
  it, or a path that is missing or of the wrong kind (say --workdir naming a
  file), whose message names the path.

Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import ast
import os
import sys
import traceback
from typing import Callable

from absl import app, flags


class UserError(Exception):
  """A mistake in what the user asked for, fully explained by its message:
  the command-line tools print the message alone (`run`)."""


class BadArgument(UserError, ValueError):
  """A flag or argument value a tool refuses (an unknown --variants name, a
  --workdir holding runs of another config), named in the message."""


def template_problem(template) -> str | None:
  """Why `template` cannot take one class name where its '{}' is, or None
  (captions from class names, zero-shot prompts)."""
  if not isinstance(template, str):
    return f"{template!r} is not a string"
  try:
    filled = template.format("\0"), template.format("\1")
  except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
    return (f"{template!r} takes one '{{}}' for the class name and no other field "
            f"({type(e).__name__}: {e})")
  if filled[0] == filled[1]:
    return f"{template!r} has no '{{}}' for the class name"
  return None


def message(error: BaseException) -> str:
  """The error's message: a UserError's own, or else that of the exception that
  started the chain (ml_collections wraps a config file's failure in a second
  'not available' error), without the quotes and escapes of a KeyError's repr
  ('\\'x\\'\\nDid you mean...'). A UserError raised from another error
  already says what went wrong and where (an embedder input names its index)."""
  root = error
  while root.__cause__ is not None and not isinstance(root, UserError):
    root = root.__cause__
  text = str(root)
  for _ in range(2):  # AttributeError(KeyError(...)): a repr inside a repr
    try:
      unquoted = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
    if not isinstance(unquoted, str):
      break
    text = unquoted
  return text.strip()


def _subclass_names(cls) -> set[str]:
  return {cls.__name__}.union(*(_subclass_names(c) for c in cls.__subclasses__()))


def _from_the_parser(error: BaseException) -> bool:
  """Whether `error` was raised by absl or ml_collections themselves (an
  override naming no field, a value of the wrong type), not by code in a
  config file, which keeps its traceback."""
  frames = traceback.extract_tb(error.__traceback__)[1:]  # the first is parse_flags'
  return all(f"{os.sep}absl{os.sep}" in f.filename or f"{os.sep}ml_collections{os.sep}" in f.filename
             for f in frames)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.parse_flags_with_usage), with the command-line
  mistakes reported in one line: an override naming no config field (a
  KeyError's repr, with ml_collections' "Did you mean" when a field is
  close), a UserError raised by a config file (an unknown ':ARG'; absl would
  print the traceback ml_collections formats into its message), and a config
  file that does not load (ml_collections raises that only when the config
  is first read). A bug in a config file keeps its traceback."""
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    head, sep, trace = text.partition(": Error whilst parsing config file:")
    last = trace.strip().splitlines()[-1].strip() if sep else ""
    if sep and last.split(":")[0].rsplit(".", 1)[-1] in _subclass_names(UserError):
      text = f"{head}: {last}"  # the config file's own refusal, without the traceback above it
    sys.exit(f"error in the command line: {text}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:
    if not _from_the_parser(e):
      raise
    sys.exit(f"error in the command line: a --config override names no config field: {message(e)}")
  except (TypeError, ValueError) as e:
    if not _from_the_parser(e):
      raise
    sys.exit(f"error in the command line: {message(e)}")
  for name in list(flags.FLAGS):
    try:  # a config that failed to load raises on any attribute; other values do not
      getattr(flags.FLAGS[name].value, "to_dict", None)
    except OSError as e:
      sys.exit(f"error in the command line: --{name}: {message(e)}")
  return args


# A path the user gave that is missing, of the wrong kind, or not theirs to write.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def exit_on_user_error(fn: Callable, *args):
  """fn(*args), with a UserError or a path error ending the program as one line."""
  try:
    return fn(*args)
  except (UserError, *_PATH_ERRORS) as e:
    sys.exit(f"error: {message(e)}")


def run(main: Callable[[list[str]], object]) -> None:
  """absl's app.run(main) for an ito_jax command: mistakes in one line (module doc)."""
  exit_on_user_error(lambda: app.run(main, flags_parser=parse_flags))
