# silofed — one entry point for people and CI alike.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all coverage lint protos bench lock clean wheel

# The torch pin goes in first: it is the CPU build on this machine's disk, and an unpinned
# torch (asked for by any later package) could pull a multi-GB CUDA build.
$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -c requirements.lock -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The wheel an operator installs (docs/deployment.md): the runtime packages only. Built without
# isolation by the venv's setuptools, from a fresh build/ (setuptools reuses stale files there).
wheel: $(STAMP)
	rm -rf build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	rm -rf build

demo: $(STAMP)
	$(PY) -m examples.digits.demo

# Two steps: the fast unit step first (in-process tests, real gRPC on loopback included), then the
# end-to-end step (real coordinator and silo processes), so a unit failure is reported in seconds.
# Both run on pytest-xdist workers. The unit step keeps a file's tests on one worker
# (`--dist loadfile`); the e2e step hands out single tests (`--dist loadgroup`: a long file does
# not hold one worker while the others idle) except those sharing a module-scoped federation,
# which tests/conftest.py groups so it starts once. The e2e step's workers mostly wait on their
# processes, hence more workers than cores. TEST_WORKERS / E2E_WORKERS=0 runs a step in this process.
TEST_WORKERS ?= 2
E2E_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not e2e" $(PYTEST_ARGS)
	$(PY) -m pytest -q -n $(E2E_WORKERS) --dist loadgroup -m "e2e and not slow" $(PYTEST_ARGS)

# Line coverage of `make test`'s tests, the coordinator and silo processes they start included
# ([tool.coverage] in pyproject.toml: patch = subprocess); in one process, as the figures
# before and after were taken. A SIGKILLed process (the chaos tests) records nothing. The
# e2e processes start as fresh interpreters here (SILOFED_TEST_NO_LAUNCHER=1), which is how
# coverage.py's subprocess patch follows them (tests/launcher.py forks instead).
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	SILOFED_TEST_NO_LAUNCHER=1 $(VENV)/bin/coverage run -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report

# Includes the slow-marked tests (50M-parameter round and the like).
test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check protos secagg coordinator silo_agent silofed examples bench tests
	$(VENV)/bin/ruff format --check protos secagg coordinator silo_agent silofed examples bench tests
	$(VENV)/bin/mypy secagg coordinator silo_agent silofed examples protos/names.py protos/blobs.py

protos: $(STAMP)
	$(PY) -m protos.generate

bench: $(STAMP)
	$(PY) bench/secagg_micro.py
	$(PY) bench/round.py --silos 3 --params 1000000
	$(PY) -m bench.convergence

lock:
	$(PIP) freeze --exclude-editable | grep -v '^torch==' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
