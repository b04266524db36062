# Two commands from a fresh clone (README: "Set up, run, test"):
#   make bench   the benchmark on whatever device is present (python -m lie_kernels.bench)
#   make test    the test suite (what CI runs, through .ci/run)
# For development: make test-fast (everything not marked slow), make lint (ruff),
# make gate (the static kernel health table: python -m dev.kernel_report 80 90).
# Each first makes sure .venv is installed: it creates it and installs requirements.txt and
# the package (editable) when .venv is missing or a dependency file changed since the last
# install (the stamp's name carries their hash); otherwise it reuses .venv as it is.
# Flags pass through ARGS:  make bench ARGS="cpu-core --quick"   make test ARGS="-x -q"
# ARGS that name tests run exactly those (make test ARGS="tests/test_math.py"); without a
# path pytest runs its testpaths (tests/).

PYTHON ?= python3
VENV ?= .venv
DEPS := requirements.txt pyproject.toml setup.py
HASH := $(shell cat $(DEPS) | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)
STAMP := $(VENV)/.installed-$(HASH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: bench test test-fast lint gate env
bench: $(STAMP)
	$(VENV)/bin/python -m lie_kernels.bench $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

gate: $(STAMP)
	env -u TRITON_INTERPRET $(VENV)/bin/python -m dev.kernel_report 80 90

env: $(STAMP)

$(STAMP):
	@echo "== installing $(VENV): requirements.txt (torch's CUDA build: about 6 GB) and the package"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-build-isolation -e .
	touch $@
