#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the test suite (CPU, no GPU needed).
#   bash scripts/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
