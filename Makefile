# Trustweave: the two commands are `make demo` and `make test`; both set up what is missing.

SHELL := /bin/bash
ENVOY_BIN = $(shell scripts/envoy-bin.sh)
export ENVOY_BIN

.PHONY: setup demo demo-istio test lint build wasm bench bench-filter bench-sds bench-instructions fuzz-smoke fuzz

setup:
	@scripts/setup.sh

WASM = target/wasm32-wasip1/wasm/trustweave_filter.wasm
WASM_REGO = target/wasm32-wasip1/wasm/trustweave_filter_rego.wasm
## Tests only: traps on demand (feature test-trap), to test Envoy's FAIL_RELOAD.
WASM_TRAP = target/wasm32-wasip1/wasm/trustweave_filter_trap.wasm

build: setup wasm
	cargo build --workspace --bins

## The proxy-wasm filter, with its own size-optimised profile: the small module
## (JSON policies) and the one with Rego mode (regorus' compiled VM).
wasm: setup
	cargo build -p trustweave-filter --lib --target wasm32-wasip1 --profile wasm --features rego
	cp $(WASM) $(WASM_REGO)
	cargo build -p trustweave-filter --lib --target wasm32-wasip1 --profile wasm --no-default-features --features test-trap
	cp $(WASM) $(WASM_TRAP)
	cargo build -p trustweave-filter --lib --target wasm32-wasip1 --profile wasm --no-default-features
	@ls -l $(WASM) $(WASM_REGO) $(WASM_TRAP) | awk '{print $$9 ": " $$5 " bytes"}'

## The cross-cloud mesh on this machine (three federated clouds and on-prem), with a report;
## keeps running until Ctrl-C (`./target/debug/trustweave-demo --once` exits after the report).
demo: build
	./target/debug/trustweave-demo

## The same mesh with the real Istio control plane (aws and gcp multi-primary: kube-apiserver,
## istiod, pilot-agent VM proxies, each in its own network namespace; needs root), with the
## control plane's view added; `./target/debug/trustweave-demo-istio --once` exits after the report.
demo-istio: build
	./target/debug/trustweave-demo-istio

## Every test: format, lints, unit tests, SDS protocol and real-Envoy end-to-end tests,
## and the offline validation of manifests/ and istio/.
test: setup lint wasm
	cargo build --workspace --bins
	cargo test --workspace --no-fail-fast
	python3 -m pytest -q tests/manifests
	target/opa-venv/bin/python -m pytest -q tests/rego
	./target/debug/bench-filter --smoke
	./target/debug/bench-sds --smoke
	./target/debug/bench-instructions --smoke
	$(MAKE) --no-print-directory fuzz-smoke

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p trustweave-filter -p trustweave-engine --lib --target wasm32-wasip1 --no-default-features -- -D warnings
	cargo clippy -p trustweave-filter -p trustweave-engine --lib --target wasm32-wasip1 -- -D warnings

## Benchmarks print figures side by side (no timing assertions in tests).
bench:
	cargo run --release -p trustweave-engine --example policy_size_bench

## Server Envoy CPU per request: no filter, Envoy RBAC, trustweave-filter, dry run (writes BENCHMARKS.md).
## SDS fan-out: 100, 1,000 and 10,000 Envoy-like clients per pod and per node;
## writes the `sds` section of BENCHMARKS.md.
bench-sds: setup
	cargo build --release -p trustweave-sds -p trustweave-e2e --bin trustweave-sds --bin bench-sds
	./target/release/bench-sds --output BENCHMARKS.md

bench-filter: setup wasm
	cargo build --release -p trustweave-e2e --bin bench-filter
	./target/release/bench-filter --output BENCHMARKS.md

## Instruction counts (callgrind) of the engine's decision, a Rego evaluation and an SDS push:
## the `instructions` section of BENCHMARKS.md, stable whatever else the machine does.
bench-instructions: setup
	cargo build --release -p trustweave-engine -p trustweave-sds --examples
	cargo build --release -p trustweave-e2e --bin bench-instructions
	./target/release/bench-instructions --output BENCHMARKS.md

## cargo-fuzz targets (fuzz/): SDS state machines and Workload API material.
## `make fuzz-smoke` runs each for FUZZ_SECONDS (10) from the committed seeds; `make fuzz` for 10 minutes.
FUZZ_TARGETS = sotw_requests delta_requests workload_api_material
FUZZ_SECONDS ?= 10
fuzz-smoke:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	set -o pipefail; cd fuzz && for t in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d); \
	  cargo fuzz run -s none $$t $$work corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 2>&1 | tail -1 || exit 1; \
	  rm -rf $$work; \
	done

fuzz:
	$(MAKE) fuzz-smoke FUZZ_SECONDS=600
