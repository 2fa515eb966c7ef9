"""Every Triton kernel compiles for sm_80 and sm_90 at the GPU tiles, with no spills and <= 128 registers.

No GPU is needed: Triton's NVIDIA backend and the ptxas / cuobjdump in its wheel compile and read
the cubins (`spiking/triton_resources.py`). It runs in a subprocess because this test
session runs the kernels through TRITON_INTERPRET=1 (tests/conftest.py), which replaces them.
Triton caches the compiled kernels, so after the first run on a machine this takes seconds.

Run: python -m pytest tests/test_triton_compile.py -q
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_fits_registers_without_spilling_on_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "spiking.triton_resources", "--json"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    for r in rows:
        print(f"{r['kernel']:26s} {r['arch']} {r['dtype']}: {r['registers']} registers, stack {r['stack']}, "
              f"local {r['local']}, shared {r['shared']} (tile {r['tile']}, {r['warps']} warps)")
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_scan_fwd_kernel", "_scan_bwd_kernel", "_state_update_kernel", "_gate_neuron_fwd_kernel",
                       "_gate_neuron_bwd_kernel"}
    assert {(r["arch"], r["dtype"]) for r in rows} == {(a, d) for a in ("sm_80", "sm_90") for d in ("fp32", "bf16")}
    for r in rows:
        name = f"{r['kernel']} {r['arch']} {r['dtype']}"
        assert r["stack"] == 0 and r["local"] == 0, f"{name} spills: stack {r['stack']}, local {r['local']}"
        assert r["registers"] <= 128, f"{name}: {r['registers']} registers per thread"
