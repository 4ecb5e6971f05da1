# Two entry points: `make demo` and `make test`. Both create (or reuse) .venv
# from requirements.txt with nothing but python3 on the machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Test processes (pytest-xdist); `make test TEST_WORKERS=8` on a bigger machine.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ito_jax needs Python >= 3.11 (the pinned jax, numpy and flax require it), and $(PYTHON) is " + sys.version.split()[0] + ": run make PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ito_jax.main --config=configs/tiny_cpu.py --workdir=workdirs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" tests

clean:
	rm -rf $(VENV) workdirs
