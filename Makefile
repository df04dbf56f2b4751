# Trustweave: the two commands are `make demo` and `make test`; both set up what is missing.

SHELL := /bin/bash
ENVOY_BIN = $(shell scripts/envoy-bin.sh)
export ENVOY_BIN

.PHONY: setup demo test lint build

setup:
	@scripts/setup.sh

build: setup
	cargo build --workspace --bins

## Local two-trust-domain demo: SPIRE agent stand-ins → trustweave-sds → real Envoy.
demo: build
	./target/debug/trustweave-demo

## Every test: format, lints, unit tests, SDS protocol tests and real-Envoy end-to-end tests.
test: setup lint
	cargo test --workspace --no-fail-fast

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
