"""How `make test` (`pytest -n N --dist loadgroup`) keeps an expensive fixture
to one build: tests that share one go to the same worker, in one piece.

The tests of the tiny reference run form one group, and a module's tests that
use a module-scoped fixture form another; the rest are spread one by one.
pytest-xdist reads the `xdist_group` marks in its own collection hook, which
turns them into a node-id suffix, so this hook must run before it (tryfirst).

pytest 9.2 broke that suffix (pytest-xdist issue #1386: the node id became a
structured value that xdist's assignment no longer changes), and every group
was silently spread again: each worker built the fixtures it met for itself.
requirements.txt pins pytest 9.1.1 for that reason; tests/test_grouping.py
runs a small suite under xdist and fails when a group is split."""

import pytest

SESSION_GROUPS = ("tiny_reference_run",)  # session fixtures worth one build in all


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    info = getattr(item, "_fixtureinfo", None)  # pytest's private fixture closure
    defs = info.name2fixturedefs if info is not None else {}
    group = next((name for name in SESSION_GROUPS if name in defs), None)
    if group is None and any(d.scope == "module" for fixturedefs in defs.values()
                             for d in fixturedefs):
      group = item.module.__name__
    if group is not None:
      item.add_marker(pytest.mark.xdist_group(group))
