#!/usr/bin/env bash
# Set up and run the whole test suite against local PostgreSQL and RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh test
bash scripts/services.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
