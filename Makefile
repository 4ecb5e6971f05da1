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
