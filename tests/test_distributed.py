"""Two CPU processes run the real stages through the CLI, with every launcher a user would use.

    torchrun --nproc_per_node 2 -m pipeline run RECIPE                              (DDP, gloo)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m pipeline run RECIPE
    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 2 -m pipeline run RECIPE

Every rank runs each stage function (the stage's Trainer trains over all of them); only rank 0
writes the lock, recipe.yaml, run.log and the manifests. Checked here: data + teacher under both
launchers; distill under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (same weights as DDP); GRPO under DDP
and ZeRO-2; the whole recipe in one ZeRO-3 command; the data is sharded (an optimizer step
consumes processes × batch rows); a bad recipe fails on every rank before anything is written. distill and rl start from a data + teacher +
distill run made once, in this process, and copied per test (`--only distill` / `--only rl`).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_distributed.py -q   (~3 min on 2 cores; the
first DeepSpeed run also JIT-compiles one op, ~45 s once)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from safetensors.torch import load_file
from test_runner import write_real_recipe
from transformers import AutoModelForCausalLM

import spiking  # noqa: F401  registers SpikingMamba with AutoModelForCausalLM
from pipeline.manifest import read_manifest
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

LAUNCHERS = {
    "torchrun": ([str(BIN / "torchrun"), "--nproc_per_node", "2"], {}),
    "accelerate": (
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no"],
        {"ACCELERATE_USE_CPU": "true"},
    ),
    # DeepSpeed on CPU: no --cpu (DeepSpeed picks its CPU accelerator itself); the JSON's "auto"
    # fields are filled by the HF / TRL trainers from the recipe
    **{
        zero: ([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"{zero}.yaml"),
                "--num_processes", "2", "--num_machines", "1"], {})
        for zero in ("zero2", "zero3")
    },
}


def launch(launcher: str, *args: str) -> subprocess.CompletedProcess:
    if launcher.startswith("zero"):
        pytest.importorskip("deepspeed")
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


# ------------------------------------------------------------------ distill and GRPO on 2 processes

BATCH = 4  # per-process batch of distill; GRPO: 4 completions per process = 1 prompt × 4 generations
RL_PROMPTS = 8


def write_full_recipe(folder: Path, run_dir: Path) -> Path:
    """The data + teacher recipe of test_runner with tiny distill and GRPO stages after it."""
    recipe = yaml.safe_load(write_real_recipe(folder, run_dir).read_text())
    recipe["stages"]["data"]["rl_prompts"] = RL_PROMPTS
    recipe["stages"]["distill"] = {"max_steps": 6, "batch_size": BATCH, "save_steps": 3, "logging_steps": 2,
                                   "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4, "calibration_batches": 1}
    recipe["stages"]["rl"] = {"algo": "grpo", "rewards": ["arith_exact"], "eval_samples": 4,
                              "trl": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                                      "max_completion_length": 4, "learning_rate": 0.05, "logging_steps": 1, "save_steps": 1}}
    path = folder / "full.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory) -> Path:
    """data + teacher + distill run once, in this process (1 process): copied by the tests below."""
    folder = tmp_path_factory.mktemp("upstream")
    path = write_full_recipe(folder, folder / "run")
    assert run_recipe(load_recipe(path), until="distill") == {"data": "ran", "teacher": "ran", "distill": "ran"}
    return folder / "run"


def copy_run(upstream_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished upstream run and a recipe pointing at it (the stages stay done:
    the run folder is not part of any fingerprint)."""
    run_dir = tmp_path / "run"
    shutil.copytree(upstream_run, run_dir)
    return write_full_recipe(tmp_path, run_dir), run_dir


def check_one_manifest(stage_dir: Path) -> dict:
    """Exactly one manifest, no leftover temp file, written by a 2-process run."""
    assert [p.name for p in stage_dir.glob("manifest*")] == ["manifest.json"]
    assert not list(stage_dir.glob(".*.tmp-*"))
    manifest = read_manifest(stage_dir)
    assert manifest["num_processes"] == 2
    return manifest


def steps_per_epoch(rows: int, rows_per_step: int) -> int:
    return -(-rows // rows_per_step)  # the sharded dataloader's length (even batches: rounded up)


@pytest.fixture(scope="module")
def ddp_distill(upstream_run, tmp_path_factory) -> Path:
    """distill re-run under torchrun with 2 processes (DDP over gloo); its run folder."""
    path, run_dir = copy_run(upstream_run, tmp_path_factory.mktemp("ddp"))
    result = launch("torchrun", "run", str(path), "--only", "distill")
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir


@pytest.mark.slow
def test_distill_under_torchrun_shards_the_data_and_saves_one_loadable_student(ddp_distill, upstream_run):
    manifest = check_one_manifest(ddp_distill / "distill")
    assert manifest["metrics"]["steps"] == 6 and "student_accuracy" in manifest["metrics"]  # rank 0 evaluated
    student = AutoModelForCausalLM.from_pretrained(ddp_distill / "distill")
    assert type(student).__name__ == "SpikingMambaForCausalLM" and any(True for _ in spiking.iter_neurons(student))

    # Sharded, not replicated: each optimizer step consumes 2 × BATCH distinct blocks, so an epoch
    # has half the steps of the 1-process run (the logged epoch doubles); replicated data would
    # give the 1-process figures.
    blocks = len(load_from_disk(str(upstream_run / "data" / "corpus"))["train"])
    for run_dir, processes in ((ddp_distill, 2), (upstream_run, 1)):
        log = json.loads((run_dir / "distill" / "train_log.json").read_text())
        first = next(entry for entry in log if "loss" in entry)
        assert first["epoch"] == pytest.approx(first["step"] / steps_per_epoch(blocks, processes * BATCH))
    # and the two runs trained different students (2× the data per step)
    ddp, single = load_file(ddp_distill / "distill" / "model.safetensors"), load_file(upstream_run / "distill" / "model.safetensors")
    assert any(not torch.equal(ddp[k], single[k]) for k in ddp if k in single)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_distill_under_deepspeed_gives_the_ddp_student(tmp_path, upstream_run, ddp_distill, zero):
    """ZeRO shards optimizer state (2) and weights (3) but computes DDP's update: same student.
    ZeRO-3 also checks that rank 0 evaluates the gathered weights instead of hanging on its shard."""
    path, run_dir = copy_run(upstream_run, tmp_path)
    result = launch(zero, "run", str(path), "--only", "distill")
    assert result.returncode == 0, result.stderr[-5000:]
    manifest = check_one_manifest(run_dir / "distill")
    reference = read_manifest(ddp_distill / "distill")["metrics"]
    assert manifest["metrics"]["student_accuracy"] == reference["student_accuracy"]
    assert manifest["metrics"]["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)

    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill")
    ddp = AutoModelForCausalLM.from_pretrained(ddp_distill / "distill")
    ours, theirs = student.state_dict(), ddp.state_dict()
    assert ours.keys() == theirs.keys()
    diff = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    print(f"{zero} vs DDP: max |weight difference| {diff:.2e}")
    assert diff < 1e-5
    assert not any(p.numel() == 0 for p in student.parameters())  # no empty ZeRO-3 shard was saved


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "zero2"])
def test_grpo_on_two_processes(tmp_path, upstream_run, launcher):
    path, run_dir = copy_run(upstream_run, tmp_path)
    result = launch(launcher, "run", str(path), "--only", "rl")
    assert result.returncode == 0, result.stderr[-5000:]
    manifest = check_one_manifest(run_dir / "rl")
    assert manifest["metrics"]["steps"] == 2 and "accuracy_after" in manifest["metrics"]
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "rl")
    assert not any(p.numel() == 0 for p in policy.parameters())

    # GRPO shards prompts: 4 completions per process = 1 prompt × 4 generations, so a step covers
    # 2 of the 8 prompts (1 in a single process) and the logged epoch after step 1 is 2/8
    log = json.loads((run_dir / "rl" / "train_log.json").read_text())
    first = next(entry for entry in log if entry.get("step") == 1)
    assert first["epoch"] == pytest.approx(2 / RL_PROMPTS)
    assert "rewards/arith_exact/mean" in first


@pytest.mark.slow
def test_every_stage_under_zero3_in_one_command(tmp_path):
    """data → teacher → distill → sparsify → rl in one `accelerate launch` with ZeRO-3 (weights
    sharded): every stage's rank 0 evaluates the gathered model instead of hanging on its shard,
    a stage's ZeRO-3 config does not shard the next stage's loading, and every output is whole."""
    run_dir = tmp_path / "run"
    path = write_full_recipe(tmp_path, run_dir)
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["sparsify"] = {"max_steps": 2, "batch_size": BATCH, "save_steps": 1, "logging_steps": 1,
                                    "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4, "calibration_batches": 1}
    recipe["stages"] = {k: recipe["stages"][k] for k in ("data", "teacher", "distill", "sparsify", "rl")}
    path.write_text(yaml.safe_dump(recipe))
    result = launch("zero3", "run", str(path))
    assert result.returncode == 0, result.stderr[-5000:]
    for stage in ("teacher", "distill", "sparsify", "rl"):
        manifest = check_one_manifest(run_dir / stage)
        model = AutoModelForCausalLM.from_pretrained(run_dir / stage)
        assert not any(p.numel() == 0 for p in model.parameters()), stage  # no empty ZeRO-3 shard saved
        assert all(torch.isfinite(p).all() for p in model.parameters()), stage
    assert "teacher_accuracy" in read_manifest(run_dir / "teacher")["metrics"]
    assert "student_accuracy" in read_manifest(run_dir / "sparsify")["metrics"]
    assert "accuracy_after" in read_manifest(run_dir / "rl")["metrics"]
