#!/usr/bin/env bash
# Installs everything memcity-pipeline needs into ./.venv (idempotent; `make install` calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# bubblewrap isolates the local sandbox (Debian package); install it when we can.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing bubblewrap (sandbox isolation)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "WARNING: bwrap not found and not root: the local sandbox will run without namespaces" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch that lies on the machines' disk; a looser pin pulls a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
# llama-cpp-python builds from source the first time (about 10 minutes on 2 cores); pip caches it.
"$VENV/bin/python" -m pip install -q -e ".[local,dev]"
touch "$VENV/.installed"
