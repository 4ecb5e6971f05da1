"""An in-memory stand-in for gs:// that keeps GCS's one relevant limit (no
append), plugged in under etils.epath through fsspec's registry."""

import importlib

import fsspec
import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store = {}  # this class's own, not MemoryFileSystem's
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=False, **kwargs):  # epath passes gcsfs's kwarg
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return "/" + path.strip("/")

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("object stores cannot append")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs():
  """Routes gs:// paths to FakeGCS for one test; yields its store {path: file}."""
  registry = importlib.import_module("fsspec.registry")  # the module, not fsspec.registry's mapping
  saved = {p: registry._registry.get(p) for p in ("gs", "gcs")}
  for p in saved:
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  yield FakeGCS.store
  FakeGCS.store.clear()
  for p, impl in saved.items():  # back to gcsfs (or whatever was registered)
    if impl is None:
      registry._registry.pop(p, None)
    else:
      registry._registry[p] = impl
  backend.fsspec_backend._get_filesystem.cache_clear()
