#!/usr/bin/env bash
# Create .venv (if missing) and install the project from this checkout with the given extra.
set -euo pipefail
extra="${1:-}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "$extra" ]; then
  .venv/bin/python -m pip install -q ".[${extra}]"
else
  .venv/bin/python -m pip install -q .
fi
