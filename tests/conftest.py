import os
import sys

# The suite compiles hundreds of small programs and runs most of them a few
# times, so LLVM's optimisation of the CPU code costs more than it saves
# (tests/test_accumulation.py + tests/test_ito.py: 302 -> 193 CPU seconds).
# XLA's own passes (fusion, SPMD partitioning, buffer assignment) still run.
# Set before JAX starts; subprocesses that train set their own XLA_FLAGS.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Tests import `configs` and `ito_jax` from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


import pytest  # noqa: E402

from grouping import pytest_collection_modifyitems  # noqa: E402,F401  (a hook)


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
  # One cache per pytest-xdist worker: JAX writes cache entries without a lock,
  # so two workers must not fill the same directory at once.
  name = "jax_compilation_cache_" + os.environ.get("PYTEST_XDIST_WORKER", "main")
  cache_dir = str(cache.mkdir(name) if cache else base / "jax_cache")
  run = dict(workdir=str(base / "run"), data_dir=str(base / "data"),
             cache_dir=cache_dir, log=str(base / "run.log"))
  rc = tiny_run.run(tiny_run.train_args(run["workdir"], run["data_dir"]),
                    tiny_run.env(run["cache_dir"]), run["log"])
  assert rc == 0, open(run["log"]).read()[-3000:]
  return run


@pytest.fixture(scope="session")
def partial_data(tmp_path_factory):
  """A small ito_shapes build (300 train, 40 eval) and its tokenizer, shared
  by the partially aligned tests (partial_helpers.data_config reads it):
  (data_dir, builder, tokenizer)."""
  from ito_jax.data import synthetic
  from ito_jax.data import tokenizer as tokenizer_lib

  data_dir = str(tmp_path_factory.mktemp("partial_data"))
  builder = synthetic.prepare(data_dir, num_train=300, num_eval=40, seed=0)
  tok = tokenizer_lib.train_tokenizer(synthetic.train_captions(builder),
                                      os.path.join(data_dir, "tok.model"), 128)
  return data_dir, builder, tok


@pytest.fixture(scope="module")
def embedder(tiny_reference_run):
  """The tiny reference run's export loaded for serving (tests/test_serve*.py)."""
  from ito_jax import serve

  return serve.load(os.path.join(tiny_reference_run["workdir"], "export"), max_batch=8)
