"""scripts/gpu_check.sh parses, and without CUDA it stops at once with a message (exit 2), never silently.

The script itself needs a GPU (README, Kernels: the first GPU run); here only its guard is checked.

Run: python -m pytest tests/test_gpu_check.py -q
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run for minutes")
def test_gpu_check_without_cuda_fails_loudly(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "gpu_check.json"))
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    print(result.stdout, result.stderr)
    assert result.returncode == 2
    assert "sees no CUDA device" in result.stderr and "FAILED before any stage ran" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()
