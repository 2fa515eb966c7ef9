#!/usr/bin/env bash
# Create .venv (if missing) and install spikerl with its dev extras. Idempotent.
# Used by scripts/quickstart.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is pinned exactly in pyproject.toml: a looser spec would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
