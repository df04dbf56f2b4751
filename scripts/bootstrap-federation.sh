#!/usr/bin/env bash
# Bootstraps federation between the clouds' SPIRE servers, once, declaratively:
# each ClusterFederatedTrustDomain gets its peer's current bundle in
# spec.trustDomainBundle, so https_spiffe can authenticate the peer's bundle
# endpoint; from then on the servers refresh each other from the endpoints.
#
#   scripts/bootstrap-federation.sh aws=<kube-context> gcp=<kube-context> azure=<kube-context>
#
# Each cloud's resources are named after the peer cloud (overlays/<cloud>/federation.yaml).
set -euo pipefail
declare -A context
for pair in "$@"; do
  context[${pair%%=*}]=${pair#*=}
done
if [ "${#context[@]}" -lt 2 ]; then
  echo "usage: $0 aws=<context> gcp=<context> [azure=<context>]" >&2
  exit 2
fi
declare -A bundle
for cloud in "${!context[@]}"; do
  bundle[$cloud]=$(kubectl --context "${context[$cloud]}" -n spire exec spire-server-0 -c spire-server -- \
    /opt/spire/bin/spire-server bundle show -format spiffe -socketPath /tmp/spire-server/private/api.sock)
done
for cloud in "${!context[@]}"; do
  for peer in "${!context[@]}"; do
    [ "$cloud" = "$peer" ] && continue
    patch=$(python3 -c 'import json,sys; print(json.dumps({"spec": {"trustDomainBundle": sys.stdin.read()}}))' <<<"${bundle[$peer]}")
    kubectl --context "${context[$cloud]}" patch clusterfederatedtrustdomain "$peer" --type merge -p "$patch"
    echo "$cloud now holds $peer's bundle"
  done
done
