# wfstate: every target is documented with '##'; `make help` lists them.
# `make demo` and `make test` do all set-up on a fresh clone: a .venv with the pinned
# dev dependencies and the Rust extension built in release mode by maturin.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_VENV := $(VENV)/.installed
STAMP_BUILD := $(VENV)/.built
RUST_SOURCES := $(shell find rust -name '*.rs') Cargo.toml Cargo.lock pyproject.toml
export PYTHONDONTWRITEBYTECODE := 1
# cargo test links libpython: point the loader at the interpreter's shared library.
PYLIBDIR := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')")
export LD_LIBRARY_PATH := $(PYLIBDIR):$(LD_LIBRARY_PATH)
export PYO3_PYTHON := $(abspath $(BIN)/python)

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP_VENV): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

.PHONY: venv
venv: $(STAMP_VENV) ## Create .venv with the pinned development dependencies

$(STAMP_BUILD): $(STAMP_VENV) $(RUST_SOURCES)
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release --quiet
	touch $@

.PHONY: build
build: $(STAMP_BUILD) ## Build the Rust extension (release) into .venv

.PHONY: demo
demo: build ## The main job: simulate 1,000 workflow executions and print the summary
	$(BIN)/python -m wfstate.demo

.PHONY: test
test: lint rust-test py-test ## Every test suite and linter (what CI runs)

.PHONY: lint
lint: build ## cargo fmt/clippy, ruff format/check, mypy --strict, stubtest
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(BIN)/ruff format --check python tests benches
	$(BIN)/ruff check python tests benches
	$(BIN)/mypy --strict
	$(BIN)/python -m mypy.stubtest wfstate._core

.PHONY: rust-test
rust-test: $(STAMP_VENV) ## cargo test
	cargo test

.PHONY: py-test
py-test: build ## pytest
	$(BIN)/python -m pytest -q

.PHONY: chaos
chaos: build ## 5 minutes of 8 workers on 100 executions: SIGKILLs, a PostgreSQL restart, then the checker
	$(BIN)/python tests/chaos.py --backend postgresql --workers 8 --executions 100 \
		--duration $(or $(CHAOS_SECONDS),300) --directory chaos-run
	$(BIN)/python tests/chaos.py --backend sqlite --workers 4 --executions 40 \
		--duration 60 --no-restart --directory chaos-run-sqlite

.PHONY: bench
bench: build ## Benchmarks (pytest-benchmark and the Rust map comparison); record in BENCHMARKS.md
	$(BIN)/python -m pytest benches -q --benchmark-enable --benchmark-only \
		--benchmark-columns=min,median,mean,max,stddev,rounds --benchmark-sort=name
	cargo bench --bench maps

.PHONY: fmt
fmt: $(STAMP_VENV) ## Format Rust and Python sources in place
	cargo fmt
	$(BIN)/ruff format python tests benches
	$(BIN)/ruff check --fix python tests benches

.PHONY: clean
clean: ## Remove the venv and build products
	rm -rf $(VENV) target .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks chaos-run chaos-run-sqlite
