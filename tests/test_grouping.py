"""`make test`'s grouping (tests/grouping.py) holds under pytest-xdist: a small
suite run with `-n 2 --dist loadgroup` builds each shared fixture once."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f"""
import os
import sys

import pytest

sys.path.insert(0, {TESTS!r})
from grouping import pytest_collection_modifyitems  # noqa: F401


def _built(name):
  with open(os.path.join(os.path.dirname(__file__), "built.log"), "a") as f:
    f.write(name + " " + os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")


@pytest.fixture(scope="session")
def tiny_reference_run():
  _built("tiny_reference_run")
"""

MODULE_FIXTURE = """
import pytest
from conftest import _built


@pytest.fixture(scope="module")
def shared():
  _built("shared")
"""

SESSION_USERS = """
def test_{name}_{i}(tiny_reference_run):
  pass
"""


def test_shared_fixtures_are_built_once_under_loadgroup(tmp_path):
  (tmp_path / "conftest.py").write_text(CONFTEST)
  (tmp_path / "test_module_fixture.py").write_text(MODULE_FIXTURE + "".join(
      f"\n\ndef test_uses_it_{i}(shared):\n  pass\n" for i in range(4)))
  for name in ("one", "two"):  # the session fixture's users in two modules
    (tmp_path / f"test_session_{name}.py").write_text("".join(
        SESSION_USERS.format(name=name, i=i) for i in range(3)))
  for i in range(6):  # ungrouped tests, so both workers get work
    (tmp_path / f"test_plain_{i}.py").write_text(textwrap.dedent("""
        import time

        def test_plain():
          time.sleep(0.2)
        """))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
       "--dist", "loadgroup", str(tmp_path)],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "16 passed" in proc.stdout, proc.stdout
  built = sorted((tmp_path / "built.log").read_text().split("\n")[:-1])
  # One build each; without the grouping (or under pytest 9.2, see
  # grouping.py) both workers build both fixtures.
  assert [line.split()[0] for line in built] == ["shared", "tiny_reference_run"], built
