"""Command-line mistakes end a tool with a message that names them and exit
status 1, not a traceback; bugs keep theirs."""

import os
import subprocess
import sys

import pytest

from ito_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=ROOT):
  proc = subprocess.run([sys.executable, "-m", "ito_jax.main", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return proc.returncode, proc.stderr


@pytest.mark.slow  # starts ito_jax.main
@pytest.mark.parametrize("args, want", [
    (["--config.total_stpes=4"], 'error in the command line: a --config override names no config '
                                 'field: \'total_stpes\'\nDid you mean "total_steps"'),
    (["--config.bogus=1"], "error in the command line: a --config override names no config field: bogus"),
    (["--config.loss.name=hinge"], "error: config.loss.name: unknown loss 'hinge'"),
])
def test_a_mistake_is_one_message_not_a_traceback(tmp_path, args, want):
  rc, err = _main("--config=configs/tiny_cpu.py", f"--workdir={tmp_path}", *args)
  assert rc == 1 and want in err and "Traceback" not in err, err[-2000:]


@pytest.mark.slow  # starts ito_jax.main
def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "file").write_text("")
  rc, err = _main("--config=configs/tiny_cpu.py", f"--workdir={tmp_path / 'file'}")
  assert rc == 1 and "Traceback" not in err, err[-2000:]
  assert f"error: --workdir={tmp_path / 'file'} is a file, not a directory" in err


@pytest.mark.slow  # starts ito_jax.main
def test_a_config_file_that_does_not_load_is_named(tmp_path):
  rc, err = _main("--config=configs/no_such_file.py", f"--workdir={tmp_path}")
  assert rc == 1 and "Traceback" not in err, err[-2000:]
  assert "error in the command line: --config: Failed loading config file" in err
  assert "No such file or directory: 'configs/no_such_file.py'" in err


@pytest.mark.slow  # starts ito_jax.main
def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  """A config file reading a misspelt field is a bug in that file, not a
  command-line mistake: the traceback names its line."""
  (tmp_path / "buggy.py").write_text(
      "from configs import tiny_cpu\n\n\ndef get_config(arg=None):\n"
      "  c = tiny_cpu.get_config(arg)\n  c.model.image.width = c.model.image.widht\n  return c\n")
  rc, err = _main(f"--config={tmp_path / 'buggy.py'}", f"--workdir={tmp_path / 'w'}")
  assert rc == 1 and "Traceback" in err and f'{tmp_path / "buggy.py"}", line 6' in err, err[-2000:]


def test_message_unwraps_ml_collections_errors():
  misspelt = AttributeError(KeyError("'total_stpes'\nDid you mean \"total_steps\"?"))
  assert cli.message(misspelt) == "'total_stpes'\nDid you mean \"total_steps\"?"
  try:
    try:
      raise OSError("Failed loading config file x")
    except OSError as first:
      raise OSError("not available because of an earlier failure") from first
  except OSError as e:
    assert cli.message(e) == "Failed loading config file x"


def test_message_of_a_user_error_raised_from_another_is_its_own():
  """The user error says where (an embedder input's index); its cause only how."""
  try:
    try:
      raise ValueError("cannot identify image file")
    except ValueError as cause:
      raise cli.UserError("images[1]: not a decodable image") from cause
  except cli.UserError as e:
    assert cli.message(e) == "images[1]: not a decodable image"


@pytest.mark.parametrize("template, problem", [
    ("a photo of a {}.", None),
    ("a {0} or another {0}", None),
    ("a photo", "'a photo' has no '{}' for the class name"),
    ("a photo of a {name}.", "'a photo of a {name}.' takes one '{}' for the class name and no other "
                             "field (KeyError: 'name')"),
    ("{} and {}", "'{} and {}' takes one '{}' for the class name and no other field (IndexError"),
    ("a {", "'a {' takes one '{}' for the class name and no other field (ValueError"),
    ("a {0.name}", "'a {0.name}' takes one '{}' for the class name and no other field (AttributeError"),
    ("a {0[kind]}", "'a {0[kind]}' takes one '{}' for the class name and no other field (TypeError"),
    ("{{}} {}", None),
    ("{{}}", "'{{}}' has no '{}' for the class name"),
    (3, "3 is not a string"),
])
def test_template_problem_names_what_a_template_lacks(template, problem):
  got = cli.template_problem(template)
  assert got == problem if problem is None else got.startswith(problem), got


def test_only_user_errors_are_shortened():
  class Mistake(cli.UserError):
    pass

  with pytest.raises(SystemExit, match="error: field x is wrong"):
    cli.exit_on_user_error(lambda: (_ for _ in ()).throw(Mistake("field x is wrong")))
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    cli.exit_on_user_error(lambda: 1 / 0)
