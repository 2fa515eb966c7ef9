#!/usr/bin/env bash
# The first run on a GPU: one command, <= 8 minutes on one H100 / H200, one JSON.
#
#   bash scripts/gpu_check.sh                    # -> benchmarks/results/gpu_check.json
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Stages (each under its own time limit, 470 s in all):
#   1. kernels    the CUDA kernel tests, fp32 and bf16 (tests/test_kernels.py -m gpu): every Triton
#                 kernel against its _ref twin, forward and backward; the student with triton vs ref
#   2. resources  registers / spills of every kernel at the GPU tiles (spiking.triton_resources)
#   3. speed      benchmarks/kernel_speed.py's GPU part: Triton vs mamba-ssm vs the reference scan,
#                 achieved bandwidth, fused vs unfused gate + neuron
#   4. distill    a bf16 distill step at mamba-130m's shape with each available scan backend
#                 (benchmarks/gpu_distill_step.py; the backends' losses must agree)
#
# Loud, not silent: a stage that fails, times out, or whose tests are skipped or missing marks the
# run FAILED (exit 1) and is named in the summary; its log tail goes into the JSON. No CUDA, no
# torch or no triton: exit 2 before anything runs. TRITON_INTERPRET is unset: the kernels must be
# compiled for the GPU, never interpreted.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # Triton 3.9's default, stated
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
START=$(date +%s)

if ! "$PY" - <<'EOF'
import sys
try:
    import torch, triton  # noqa: F401
except Exception as error:  # noqa: BLE001
    sys.exit(f"gpu_check: cannot import torch / triton: {error}")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}")
EOF
then
  echo "gpu_check: FAILED before any stage ran (see above)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$WORK/nvidia-smi.csv" 2>&1 || true

run_stage() {  # name, seconds, command...: log to $WORK/name.log, rc and wall time to $WORK/name.status
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$WORK/$name.status"
  tail -n 5 "$WORK/$name.log" | cut -c1-240
  [ "$rc" -eq 124 ] && echo "!! $name timed out after ${limit}s" >&2
  [ "$rc" -ne 0 ] && echo "!! $name exited with status $rc" >&2
  return 0
}

run_stage kernels 200 "$PY" -m pytest tests/test_kernels.py -m gpu -q -rs -p no:cacheprovider \
  --junitxml "$WORK/kernels.xml"
run_stage resources 40 "$PY" -m spiking.triton_resources --json --check
run_stage speed 120 "$PY" benchmarks/kernel_speed.py --skip-cpu --reps 3 --out "$WORK/kernel_speed.json"
run_stage distill 110 "$PY" benchmarks/gpu_distill_step.py --out "$WORK/distill.json"

"$PY" - "$WORK" "$OUT" "$START" <<'EOF'
import datetime, json, subprocess, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
import torch

def status(name):
    path = work / f"{name}.status"
    if not path.is_file():
        return {"ok": False, "problem": "did not run"}
    rc, seconds = map(int, path.read_text().split())
    log = (work / f"{name}.log").read_text(errors="replace").splitlines()
    result = {"rc": rc, "seconds": seconds, "log_tail": log[-40:], "ok": rc == 0}
    if rc == 124:
        result["problem"] = "timed out"
    elif rc != 0:
        result["problem"] = f"exit status {rc}"
    return result

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        return {"missing": str(error)}

stages = {name: status(name) for name in ("kernels", "resources", "speed", "distill")}
# the kernel tests: all must run on the GPU; a skip means a GPU path was not exercised
try:
    suite = ET.parse(work / "kernels.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    stages["kernels"]["counts"] = counts
    if counts["tests"] == 0 or counts["skipped"] or counts["failures"] or counts["errors"]:
        stages["kernels"]["ok"] = False
        stages["kernels"].setdefault("problem", f"tests {counts}")
except (OSError, ET.ParseError, AttributeError) as error:
    stages["kernels"]["ok"] = False
    stages["kernels"].setdefault("problem", f"no junit report: {error}")
if stages["resources"].get("ok"):  # its JSON is the one stdout line that opens a list
    lines = [line for line in stages["resources"]["log_tail"] if line.startswith("[{")]
    stages["resources"]["rows"] = json.loads(lines[-1]) if lines else None
    if not lines:
        stages["resources"]["ok"] = False
        stages["resources"]["problem"] = "printed no resource table"
speed = read_json(work / "kernel_speed.json")
distill = read_json(work / "distill.json")
for name, payload in (("speed", speed), ("distill", distill)):
    if "missing" in payload:
        stages[name]["ok"] = False
        stages[name].setdefault("problem", f"no JSON: {payload['missing']}")
if "gpu" not in speed and "missing" not in speed:
    stages["speed"]["ok"] = False
    stages["speed"].setdefault("problem", "kernel_speed.py ran no GPU part")
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = None
payload = {
    "what": "scripts/gpu_check.sh: CUDA kernel tests, kernel resources, kernel speed, bf16 distill step (mamba-130m shape)",
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "commit": commit,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "nvidia_smi": (work / "nvidia-smi.csv").read_text(errors="replace") if (work / "nvidia-smi.csv").is_file() else None,
    "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
    "wall_s": int(time.time()) - start,
    "ok": all(s.get("ok") for s in stages.values()),
    "stages": stages,
    "kernel_speed": speed,
    "distill_step": distill,
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(payload, indent=1))
print(f"\ngpu_check: wrote {out} ({payload['wall_s']} s)")
for name, s in stages.items():
    verdict = "ok" if s.get("ok") else "FAILED: " + s.get("problem", "?")
    print(f"  {name:10s} {verdict}  ({s.get('seconds', '-')} s)")
sys.exit(0 if payload["ok"] else 1)
EOF
rc=$?
rm -rf "$WORK"
if [ "$rc" -ne 0 ]; then
  echo "gpu_check: FAILED (details in $OUT)" >&2
fi
exit "$rc"
