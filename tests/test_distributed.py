"""Two CPU processes (gloo) run the real data + teacher stages through the CLI.

    torchrun --nproc_per_node 2 -m pipeline run RECIPE
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m pipeline run RECIPE

Every rank runs each stage function (the teacher's Trainer trains with DDP over both); only rank 0
writes the lock, recipe.yaml, run.log and the manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_runner import write_real_recipe

from pipeline.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

LAUNCHERS = {
    "torchrun": ([str(BIN / "torchrun"), "--nproc_per_node", "2"], {}),
    "accelerate": (
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no"],
        {"ACCELERATE_USE_CPU": "true"},
    ),
}


def launch(launcher: str, *args: str) -> subprocess.CompletedProcess:
    command, extra_env = LAUNCHERS[launcher]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra_env)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([*command, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_run_data_and_teacher(tmp_path, launcher):
    run_dir = tmp_path / "run"
    path = write_real_recipe(tmp_path, run_dir)
    result = launch(launcher, "run", str(path))
    assert result.returncode == 0, result.stderr[-5000:]

    assert sorted(p.name for p in run_dir.iterdir()) == ["data", "recipe.yaml", "run.log", "teacher"]  # lock released
    for stage in ("data", "teacher"):
        assert len(list((run_dir / stage).glob("manifest*"))) == 1
        assert not list((run_dir / stage).glob(".*.tmp-*"))
        manifest = read_manifest(run_dir / stage)
        assert manifest["stage"] == stage and manifest["num_processes"] == 2
    assert read_manifest(run_dir / "teacher")["metrics"]["steps"] == 12
    log = (run_dir / "run.log").read_text()
    assert "(2 processes)" in log and log.count("teacher: done in") == 1  # rank 0 alone writes run.log

    if launcher == "torchrun":  # both ranks agree that there is nothing left to do
        again = launch(launcher, "run", str(path))
        assert again.returncode == 0, again.stderr[-5000:]
        assert "data: skipped (done)" in again.stderr and "teacher: skipped (done)" in again.stderr
        assert json.loads((run_dir / "teacher" / "manifest.json").read_text()) == read_manifest(run_dir / "teacher")


@pytest.mark.slow
def test_bad_recipe_under_torchrun_fails_on_every_rank_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    path = write_real_recipe(tmp_path, run_dir)
    result = launch("torchrun", "run", str(path), "stages.teacher.max_steps=0")
    assert result.returncode != 0
    assert result.stderr.count("stages.teacher.max_steps: Input should be greater than or equal to 1") == 2
    assert not run_dir.exists()
