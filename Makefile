# make demo  - set up .venv and run the default training job (MiniLM + LoRA on a stdlib code-search task)
# make test  - set up .venv and run the test suite (the same command CI runs)
# Needs only python3 (>= 3.10). torch 2.13.0 is installed only when no torch is importable yet; a torch you
# already have (e.g. a CUDA build) is reused through --system-site-packages and pinned so pip never replaces it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	@echo "torch==$$($(PY) -c 'import torch; print(torch.__version__)' 2>/dev/null)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[all,dev]"
	@touch $(STAMP)

demo: setup
	$(PY) -m lightning_lora.train

# one worker per core (pytest-xdist), a test file's tests on one worker so module fixtures are built once
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

test-all: setup
	$(PY) -m pytest -q -n auto --dist loadfile -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
