#!/usr/bin/env bash
# Pins every image in manifests/ and istio/ to the digest its tag points at now
# (`image: repo:tag` -> `image: repo:tag@sha256:…`), so that what runs is what
# was reviewed. Needs `crane` (go-containerregistry) and registry access; run it
# when bumping a tag, review the diff, commit. `make test` refuses `:latest`
# and untagged images.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v crane >/dev/null || { echo "install crane: go install github.com/google/go-containerregistry/cmd/crane@latest" >&2; exit 2; }
files=$(grep -rlE '^\s*image:\s' manifests istio || true)
for image in $(grep -rhoE '^\s*image:\s*\S+' $files | awk '{print $2}' | sort -u); do
  case "$image" in *@sha256:*) continue ;; esac
  digest=$(crane digest "$image")
  echo "$image -> $digest"
  for f in $files; do
    sed -i "s#image: ${image}\$#image: ${image}@${digest}#" "$f"
  done
done
