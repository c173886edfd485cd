# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch (the CPU wheel when no torch is importable and no CUDA
# is present; a torch that already imports is kept) and then this package.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.py | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA present: installing the default torch build"; \
		$(PY) -m pip install --quiet torch; \
	else \
		echo "no CUDA: installing the CPU wheel torch==2.13.0"; \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m vet_ext.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
