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
import sys
from typing import Callable

from absl import app, flags


class UserError(Exception):
  """A mistake in what the user asked for, fully explained by its message:
  the command-line tools print the message alone (`run`)."""


# What ml_collections raises while it parses --config and its overrides.
_PARSE_ERRORS = (AttributeError, KeyError, TypeError, ValueError, OSError)


def message(error: BaseException) -> str:
  """The error's message, from the exception that started a chain (ml_collections
  wraps a config file's failure in a second 'not available' error), without
  the quotes and escapes of a KeyError's repr ('\\'x\\'\\nDid you mean...')."""
  root = error
  while root.__cause__ is not None:
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.parse_flags_with_usage), with the command-line
  mistakes ml_collections raises reported in one line: a config file's own
  error (absl would print the traceback ml_collections formats into it), a
  misspelt override (a KeyError's repr), and a config file that does not
  load (ml_collections raises that only when the config is first read)."""
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    head, sep, trace = text.partition(": Error whilst parsing config file:")
    if sep:  # keep the exception's last line, not the traceback above it
      text = f"{head}: {trace.strip().splitlines()[-1].strip()}"
    sys.exit(f"error in the command line: {text}\nPass --helpshort or --helpfull to see help on flags.")
  except _PARSE_ERRORS as e:
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
