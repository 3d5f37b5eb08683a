#!/usr/bin/env bash
# Set up and run one lash-consumer worker with the built-in echo model (no API key).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
bash scripts/services.sh
exec .venv/bin/lash-consumer run "$@"
