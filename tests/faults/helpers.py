"""Shared pieces of the fault suite: a tiny five-stage recipe, a finished run folder to copy, the
CLI in a subprocess, and a kill at a chosen training step.

Every model is tiny (hidden 16, one block, state 4) and every stage trains a few dozen steps, so
a whole pipeline up to rl takes seconds on one CPU thread; the subprocess start (imports) is the
main cost, hence at most one subprocess per training stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TRAINING_STAGES = ("teacher", "distill", "sparsify", "rl")

# logging_steps 1: train_log.json is rewritten after every step, which is how a test (or
# benchmarks/fault_recovery.py) knows the step a training process has reached.
TINY_STAGES: dict[str, dict[str, Any]] = {
    "data": {"source": {"synthetic": "arithmetic", "digits": [1, 2], "num_problems": 200},
             "seq_len": 16, "rl_prompts": 16, "test_size": 12},
    "teacher": {"max_steps": 60, "batch_size": 4, "save_steps": 10, "logging_steps": 1,
                "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4},
    "distill": {"max_steps": 40, "batch_size": 4, "save_steps": 10, "logging_steps": 1, "calibration_batches": 1,
                "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4},
    "sparsify": {"modules": {"in_proj": {"kind": "atmn", "T": 2}}, "max_steps": 30, "batch_size": 4,
                 "save_steps": 10, "logging_steps": 1, "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4},
    "rl": {"algo": "grpo", "rewards": ["arith_exact"], "eval_samples": 4, "eval_batch_size": 4,
           "trl": {"max_steps": 24, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 4,
                   "learning_rate": 1e-3, "beta": 0.0, "gradient_checkpointing": False, "logging_steps": 1,
                   "save_steps": 6}},
}
TINY_MODEL = {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 1, "state_size": 4}}}


def save_steps(stage: str) -> int:
    cfg = TINY_STAGES[stage]
    return cfg["trl"]["save_steps"] if stage == "rl" else cfg["save_steps"]


def max_steps(stage: str) -> int:
    cfg = TINY_STAGES[stage]
    return cfg["trl"]["max_steps"] if stage == "rl" else cfg["max_steps"]


def write_recipe(folder: Path, run_dir: Path, stages: dict[str, Any] | None = None, model: dict | None = None,
                 name: str = "recipe.yaml") -> Path:
    """The tiny recipe (all five stages unless `stages` says otherwise) writing to `run_dir`."""
    recipe = {
        "run": {"name": "faults", "output_dir": str(run_dir), "seed": 0},
        "model": copy.deepcopy(model if model is not None else TINY_MODEL),
        "stages": copy.deepcopy(stages if stages is not None else TINY_STAGES),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ------------------------------------------------------------------------ a finished run to copy

_TEMPLATE: Path | None = None


def finished_run(tmp_path_factory) -> Path:
    """A run folder with data, teacher, distill and sparsify finished (built once per session).

    Copy it with `copy_run`: a copy at another path is "done" for the same recipe (fingerprints
    hold no paths).
    """
    global _TEMPLATE
    if _TEMPLATE is None:
        from pipeline.recipe import load_recipe
        from pipeline.runner import run_recipe

        folder = tmp_path_factory.mktemp("finished_run")
        recipe = write_recipe(folder, folder / "run")
        run_recipe(load_recipe(recipe), until="sparsify")
        _TEMPLATE = folder / "run"
    return _TEMPLATE


def copy_run(template: Path, folder: Path) -> tuple[Path, Path]:
    """Copy of the finished run into `folder/run` and the recipe that writes there: (recipe, run_dir)."""
    run_dir = folder / "run"
    shutil.copytree(template, run_dir)
    (run_dir / "run.log").unlink(missing_ok=True)  # this test's log only
    return write_recipe(folder, run_dir), run_dir


# ------------------------------------------------------------------------ folder snapshots


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: relative path -> (bytes, sha256). {} if the folder does not exist."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------ subprocesses


def spikerl(*args: str, fault: str | None = None) -> subprocess.Popen:
    """`python -m pipeline ARGS` in a subprocess, or tests/faults/child.py with a fault installed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "pipeline", *args] if fault is None else [
        sys.executable, str(ROOT / "tests" / "faults" / "child.py"), fault, *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_step(stage_dir: Path) -> int:
    """The last step a training stage logged (train_log.json, rewritten every logging step), or 0."""
    try:
        history = json.loads((stage_dir / "train_log.json").read_text())
    except (OSError, ValueError):
        return 0
    return max((entry.get("step", 0) for entry in history), default=0)


def kill_at_step(process: subprocess.Popen, stage_dir: Path, step: int, timeout: float = 240) -> int:
    """SIGKILL `process` once the stage has logged `step`; returns the last step it logged."""
    deadline = time.time() + timeout
    while logged_step(stage_dir) < step:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before step {step}: {process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"step {step} not reached in {timeout} s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # no cleanup, no finally blocks
    process.wait()
    return logged_step(stage_dir)


def complete_checkpoints(stage_dir: Path) -> list[int]:
    """Steps of the checkpoints whose trainer_state.json parses (what a resume can use)."""
    steps = []
    for folder in (stage_dir / "checkpoints").glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            steps.append(int(folder.name.split("-")[-1]))
        except (OSError, ValueError):
            continue
    return sorted(steps)


def assert_manifest_complete(run_dir: Path, stage: str) -> dict[str, Any]:
    """The stage's manifest exists and every output it lists is on disk, whole, with its size."""
    from pipeline.manifest import check_output_file, read_manifest

    manifest = read_manifest(run_dir / stage)
    assert manifest is not None, f"{stage} has no manifest"
    assert manifest["outputs"], f"{stage}'s manifest lists no outputs"
    for rel, size in manifest["outputs"].items():
        problem = check_output_file(run_dir / stage / rel, size)
        assert problem is None, f"{stage}/{rel} {problem}"
    return manifest


def raising_reward(completions, **kwargs):
    """A user reward (dotted path tests.faults.helpers.raising_reward) with a bug."""
    raise KeyError("answer_text")
