#!/usr/bin/env bash
# Regenerates this tools module (go.mod, go.sum) for one Kubernetes release.
#
# k8s.io/kubernetes requires each staging module (k8s.io/api, k8s.io/apiserver, ...)
# at v0.0.0 and replaces it with ./staging/src/k8s.io/<module>; those replaces do not
# apply to a consumer, so this module replaces each one with its released v0.<minor>
# tag. The list is read from kubernetes' own go.mod, not written by hand: a new
# minor adds modules (1.36 added cri-streaming and streaming).
#
#   tests/k8s/generate.sh v1.37.2
set -euo pipefail
K="${1:?usage: generate.sh v1.<minor>.<patch>}"
S="v0.${K#v1.}"
cd "$(dirname "$0")"
rm -f go.mod go.sum
go mod init trustweave.invalid/tests/k8s
go mod edit -go=1.26.8
GOMOD=$(go mod download -json "k8s.io/kubernetes@$K" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
# Only the main module's godebug line applies: take kubernetes' own.
godebug=$(sed -n 's/^godebug \(.*\)/\1/p' "$GOMOD")
[ -n "$godebug" ] && go mod edit -godebug="$godebug"
for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$GOMOD"); do
  go mod edit -replace="$m=$m@$S"
done
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K" "k8s.io/kubernetes/cmd/kubectl@$K"
echo "tests/k8s: kubernetes $K, $(grep -c '=> k8s.io' go.mod) staging modules replaced with $S"
