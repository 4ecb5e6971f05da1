import os
import sys

# Tests import `configs` and `ito_jax` from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_reference_run(tmp_path_factory, request):
  """One uninterrupted tiny ITO run (tests/tiny_run.py), shared by the
  checkpoint, export and serving tests: dict(workdir, data_dir, cache_dir, log).

  Its subprocesses share a JAX compilation cache kept in .pytest_cache, so
  only the first session compiles (a cached executable is the same program:
  results stay bit-identical)."""
  import tiny_run

  base = tmp_path_factory.mktemp("tiny_reference")
  cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
  cache_dir = str(cache.mkdir("jax_compilation_cache") if cache else base / "jax_cache")
  run = dict(workdir=str(base / "run"), data_dir=str(base / "data"),
             cache_dir=cache_dir, log=str(base / "run.log"))
  rc = tiny_run.run(tiny_run.train_args(run["workdir"], run["data_dir"]),
                    tiny_run.env(run["cache_dir"]), run["log"])
  assert rc == 0, open(run["log"]).read()[-3000:]
  return run
