# mtls-gateway — the README's two commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= var
# Debian packages the end-to-end tests drive (real clients and servers).
APT_PACKAGES := mosquitto mosquitto-clients redis-server libcoap3-bin openssl curl
PYTEST_ARGS ?=

.PHONY: run test lint unit e2e conformance system-deps venv clean format bench docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Start the gateway on the embedded SQLite store (demo PKI on first run).
run: $(STAMP)
	$(BIN)/mtls-gateway run --data-dir $(DATA_DIR)

## Install everything the tests need, lint, run the whole suite.
test: system-deps $(STAMP) lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

system-deps:
	@missing=""; \
	for c in /usr/sbin/mosquitto /usr/bin/mosquitto_pub /usr/bin/mosquitto_sub /usr/bin/redis-server /usr/bin/coap-client-openssl /usr/bin/openssl /usr/bin/curl; do \
	  [ -x $$c ] || missing="$$missing $$c"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages ($$missing missing)"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check gateway protocols trust tests scripts
	$(BIN)/ruff format --check gateway protocols trust tests scripts
	$(BIN)/mypy --strict gateway protocols trust

format: $(STAMP)
	$(BIN)/ruff format gateway protocols trust tests scripts
	$(BIN)/ruff check --fix gateway protocols trust tests scripts

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

e2e: system-deps $(STAMP)
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

## x509-limbo path-validation conformance (see docs/conformance.md).
conformance: $(STAMP)
	bash scripts/conformance.sh

## Gateway vs mosquitto benchmark (< 10 min; BENCH_ARGS=--quick for ~1 min). See docs/performance.md.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

## Regenerate docs/configuration.md and docs/api.md from their sources.
docs: $(STAMP)
	$(BIN)/python scripts/gen_config_docs.py
	$(BIN)/python scripts/gen_api_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
