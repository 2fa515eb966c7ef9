#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the embedded default recipe end to end.
#   bash scripts/quickstart.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spikerl run recipes/tiny.yaml "$@"
.venv/bin/spikerl status recipes/tiny.yaml "$@"
