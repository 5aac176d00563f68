# llamabridge: `make help` lists the targets.
SHELL := bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Everything slow (llama-server build, Claude Code CLI, tiny model) is cached here, by version.
export LLAMABRIDGE_CACHE ?= $(HOME)/.cache/llamabridge

.PHONY: help install install-test lock llama-server rpc-server tiny-model claude-code codex aider litellm opencode continue-cli cline run demo proxy collector env lint test test-unit bench up down logs ps keys clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/\$$\$$/$$/g' | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# The runtime dependencies at requirements.lock's versions and hashes (as the image has them),
# then llamabridge itself, editable for development.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed ## create .venv with what the services need

install-test: $(VENV)/.installed-test ## add the test tools and client SDKs to .venv

PIP_TOOLS := $(LLAMABRIDGE_CACHE)/pip-tools-7.7.0
lock: ## rewrite requirements.lock (every runtime dependency, transitive ones too, pinned with hashes) from pyproject.toml
	@test -x $(PIP_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(PIP_TOOLS) && $(PIP_TOOLS)/bin/pip install --quiet pip-tools==7.7.0; }
	$(PIP_TOOLS)/bin/pip-compile --quiet --generate-hashes --all-build-deps --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file=requirements.lock pyproject.toml

llama-server: ## make a llama-server available (PATH, $$LLAMA_SERVER_BIN, or build once); prints its path last
	@bash llama/build.sh

rpc-server: ## build llama.cpp's RPC worker (ggml-rpc-server) and a llama-server that can use it, once, into the same cache; prints the worker's path last
	@bash llama/build.sh rpc-server

tiny-model: $(VENV)/.installed-test ## generate the tiny test model (random weights, real tokenizer); prints its path last
	@$(PY) llama/tiny_model.py

claude-code: ## install the Claude Code CLI used by the end-to-end tests; prints its path last
	@bash scripts/claude-code.sh

codex: ## install the Codex CLI used by the end-to-end tests; prints its path last
	@bash scripts/codex.sh

aider: ## install Aider (its own venv in the cache) used by the end-to-end tests; prints its path last
	@bash scripts/aider.sh

litellm: ## install LiteLLM's proxy (its own venv in the cache): the tests' OpenAI-compatible server that is not llama-server; prints its path last
	@bash scripts/litellm.sh

opencode: ## install OpenCode used by the end-to-end tests; prints its path last
	@bash scripts/opencode.sh

continue-cli: ## install Continue's CLI (cn) used by the end-to-end tests; prints its path last
	@bash scripts/continue.sh

cline: ## install Cline's CLI used by the end-to-end tests; prints its path last
	@bash scripts/cline.sh

run: $(VENV)/.installed ## llama-server (LLAMA_MODEL=path.gguf, unless LLAMA_URL answers), proxy and collector; Ctrl-C stops all
	@$(PY) scripts/run_stack.py

demo: $(VENV)/.installed-test ## the whole stack on the tiny generated model: no GPU, no download, a minute
	@$(PY) scripts/run_stack.py --demo

proxy: $(VENV)/.installed ## only the proxy, against $$LLAMA_URL
	$(PY) -m proxy

collector: $(VENV)/.installed ## run the lifetime-metrics collector natively against $$LLAMA_URL (serves :9091)
	$(PY) -m collector

env: $(VENV)/.installed ## print the Claude Code / Cline / Codex / Aider / Continue / OpenCode settings for the running proxy (native or compose), with the real context window; FILE=aider|continue|opencode|codex prints that config file alone; KEY=<your key> fills it in
	@$(if $(KEY),LLAMABRIDGE_API_KEY='$(KEY)' )$(PY) -m proxy env $(if $(FILE),--file $(FILE))

# The Python that `make lint` checks: the packages, the benchmark, the scripts and the tests.
LINT_PATHS := proxy collector llamabridge dashboard bench llama scripts tests

lint: $(VENV)/.installed-test ## ruff and mypy over the Python code (pyproject.toml configures both); `make test` runs it first
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy $(LINT_PATHS)

# `make test` prepares everything it needs (tmux, venv, llama-server, ggml-rpc-server, tiny model, Claude Code, Codex, Aider, LiteLLM, OpenCode, Continue's and Cline's CLIs)
# and then runs the whole suite against real processes on loopback.
test: lint ## lint, set everything up and run the whole test suite
	@bash scripts/system-deps.sh
	@set -e; \
	LLAMA_SERVER_BIN="$$(bash llama/build.sh | tail -n 1)"; \
	RPC_SERVER_BIN="$$(bash llama/build.sh rpc-server | tail -n 1)"; \
	TINY_MODEL="$$($(PY) llama/tiny_model.py | tail -n 1)"; \
	CLAUDE_BIN="$$(bash scripts/claude-code.sh | tail -n 1)"; \
	CODEX_BIN="$$(bash scripts/codex.sh | tail -n 1)"; \
	AIDER_BIN="$$(bash scripts/aider.sh | tail -n 1)"; \
	LITELLM_BIN="$$(bash scripts/litellm.sh | tail -n 1)"; \
	OPENCODE_BIN="$$(bash scripts/opencode.sh | tail -n 1)"; \
	CONTINUE_BIN="$$(bash scripts/continue.sh | tail -n 1)"; \
	CLINE_BIN="$$(bash scripts/cline.sh | tail -n 1)"; \
	export LLAMA_SERVER_BIN RPC_SERVER_BIN TINY_MODEL CLAUDE_BIN CODEX_BIN AIDER_BIN LITELLM_BIN OPENCODE_BIN CONTINUE_BIN CLINE_BIN; \
	echo "llama-server: $$LLAMA_SERVER_BIN"; echo "rpc-server: $$RPC_SERVER_BIN"; echo "model: $$TINY_MODEL"; echo "claude: $$CLAUDE_BIN"; echo "codex: $$CODEX_BIN"; echo "aider: $$AIDER_BIN"; echo "opencode: $$OPENCODE_BIN"; echo "continue: $$CONTINUE_BIN"; echo "cline: $$CLINE_BIN"; \
	$(PY) -m pytest $(PYTEST_ARGS)

# Not part of `make test`: timings belong in a benchmark, measured against direct llama-server in
# the same run. LLAMA_MODEL=path.gguf benchmarks your model instead of the tiny one.
bench: $(VENV)/.installed-bench ## measure overhead, load, prompt-cache savings and the collector; writes bench/results/
	@bash scripts/system-deps.sh
	@LLAMA_SERVER_BIN="$$(bash llama/build.sh | tail -n 1)" $(PY) bench/run.py

$(VENV)/.installed-bench: $(VENV)/.installed-test pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

test-unit: $(VENV)/.installed-test ## only the tests that need no llama-server
	@bash scripts/system-deps.sh  # promtool checks Prometheus' config
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

up: ## the docker compose stack: llama-server (GPU; LLAMA_DEVICE=cpu for the CPU image; none with LLAMA_URL), proxy, collector, Prometheus, Grafana
	@bash scripts/compose.sh up

down: ## stop the compose stack (its volumes, with the lifetime store, stay)
	@bash scripts/compose.sh down

logs: ## follow the compose stack's logs
	@bash scripts/compose.sh logs

ps: ## the compose stack's services and their health
	@bash scripts/compose.sh ps

keys: ## API keys: list them; ADD=name [CONCURRENT=n TPM=n] adds one (shown once), REMOVE=name revokes it (compose stack or native, as in use; KEYS_FOR=compose|native)
	@ADD='$(ADD)' REMOVE='$(REMOVE)' CONCURRENT='$(CONCURRENT)' TPM='$(TPM)' KEYS_FOR='$(KEYS_FOR)' VENV='$(VENV)' MAKE='$(MAKE)' bash scripts/keys.sh

clean: ## remove the virtual environment (the cache in $$LLAMABRIDGE_CACHE stays)
	rm -rf $(VENV) .pytest_cache
