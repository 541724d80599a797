# silofed — one entry point for people and CI alike.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint protos bench lock clean

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

demo: $(STAMP)
	$(PY) -m examples.hospital.demo

# Two steps: the fast unit step first (in-process tests, real gRPC on loopback included), then the
# end-to-end step (real coordinator and silo processes), so a unit failure is reported in seconds.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m "e2e and not slow" $(PYTEST_ARGS)

# Includes the slow-marked tests (50M-parameter round and the like).
test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check protos secagg coordinator silo_agent silofed examples bench tests
	$(VENV)/bin/ruff format --check protos secagg coordinator silo_agent silofed examples bench tests
	$(VENV)/bin/mypy secagg coordinator silo_agent silofed examples

protos: $(STAMP)
	$(PY) -m protos.generate

bench: $(STAMP)
	$(PY) bench/secagg_micro.py
	$(PY) bench/round.py --silos 3 --params 1000000

lock:
	$(PIP) freeze --exclude-editable | grep -v '^torch==' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
