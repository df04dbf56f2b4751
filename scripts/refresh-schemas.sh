#!/usr/bin/env bash
# Refreshes the vendored CRD schemas in tests/manifests/schemas from DIR, which
# holds newer verbatim copies of the same files (see tests/manifests/schemas/UPSTREAM.md).
set -euo pipefail
src="${1:?usage: scripts/refresh-schemas.sh DIR}"
dest="$(cd "$(dirname "$0")/.." && pwd)/tests/manifests/schemas"
for f in istio-crd-all.gen.yaml spire.spiffe.io_clusterspiffeids.yaml \
         spire.spiffe.io_clusterfederatedtrustdomains.yaml spire.spiffe.io_clusterstaticentries.yaml; do
  cp "$src/$f" "$dest/$f"
  echo "refreshed $f ($(sha256sum "$dest/$f" | cut -c1-12))"
done
echo "Record the upstream commits in $dest/UPSTREAM.md."
