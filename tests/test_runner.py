"""Runner logic (skip / re-run / resume / --from / --only / --until), then end to end runs.

The first part uses small test-only stages: real modules written to a temp folder and put in the
stage registry in place of the real ones; each writes `step-K` files as its "checkpoints",
resumes from the ones it finds, can be made to crash at a step, and logs every call to
run_dir/calls.jsonl. The last part runs the real data + teacher stages on a tiny recipe,
including a `kill -9` in the middle of training and a resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline.recipe as recipe_module
from pipeline import UserError
from pipeline.manifest import read_manifest
from pipeline.recipe import load_recipe
from pipeline.runner import expected_fingerprints, inspect_run, run_recipe

FAKE_STAGE = '''
"""Test-only stage: writes step-K files (its checkpoints), resumes from them, logs its calls."""
import json
from pydantic import Field
from stages.context import StrictModel


class Config(StrictModel):
    steps: int = Field(3, gt=0, description="number of step files (checkpoints) to write")
    tag: str = Field("x", description="text appended to the upstream's out.txt")


def run(cfg, ctx):
    done = len(list(ctx.out_dir.glob("step-*")))  # an interrupted attempt's progress
    with open(ctx.run_dir / "calls.jsonl", "a") as f:
        f.write(json.dumps({"stage": ctx.stage, "resumed_from": done, "upstream": sorted(ctx.upstream)}) + "\\n")
    for step in range(done, cfg.steps):
        if (ctx.run_dir / f"crash-{ctx.stage}-{step}").exists():
            raise RuntimeError(f"simulated crash of {ctx.stage} at step {step}")
        (ctx.out_dir / f"step-{step}").write_text(str(step))
    previous = (list(ctx.upstream.values())[-1] / "out.txt").read_text() if ctx.upstream else ""
    (ctx.out_dir / "out.txt").write_text(previous + cfg.tag)
    return {"steps": cfg.steps, "resumed_from": done, "loss": 0.5}
'''


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Registry a -> b -> c of fake stages (plus d, registered but without a module)."""
    folder = tmp_path / "fake_stage_modules"
    folder.mkdir()
    names = {"a": "fake_stage_a", "b": "fake_stage_b", "c": "fake_stage_c", "d": "fake_stage_missing_d"}
    for module in names.values():
        if "missing" not in module:
            (folder / f"{module}.py").write_text(FAKE_STAGE)
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(recipe_module, "STAGES", names)
    yield folder
    for module in names.values():
        sys.modules.pop(module, None)


def write_recipe(tmp_path: Path, stages=None, name="r.yaml", **run) -> Path:
    recipe = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run"), **run},
        "model": {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 1}}},
        "stages": stages if stages is not None else {"a": {}, "b": {"steps": 2}, "c": {}},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "run" / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(path, *overrides, **kwargs):
    return run_recipe(load_recipe(path, list(overrides)), **kwargs)


def test_first_run_runs_all_then_rerun_skips_all(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    assert run(path) == {"a": "ran", "b": "ran", "c": "ran"}
    run_dir = tmp_path / "run"
    assert (run_dir / "c" / "out.txt").read_text() == "xxx"
    for stage in "abc":
        assert read_manifest(run_dir / stage)["stage"] == stage
    assert [c["upstream"] for c in calls(tmp_path)] == [[], ["a"], ["a", "b"]]

    assert run(path) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert len(calls(tmp_path)) == 3  # no stage function was called again
    assert "c: skipped (done)" in (run_dir / "run.log").read_text()


def test_manifest_contents(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    run(path)
    recipe = load_recipe(path)
    fingerprints = expected_fingerprints(recipe)
    manifest = read_manifest(tmp_path / "run" / "b")
    assert manifest["fingerprint"] == fingerprints["b"]
    assert manifest["upstream"] == {"a": fingerprints["a"]}
    assert manifest["upstream_outputs"] == {"a": read_manifest(tmp_path / "run" / "a")["output_id"]}
    assert manifest["config"] == {"steps": 2, "tag": "x"}
    assert manifest["metrics"] == {"steps": 2, "resumed_from": 0, "loss": 0.5}
    assert manifest["outputs"] == {"out.txt": 2, "step-0": 1, "step-1": 1}
    assert manifest["wall_s"] >= 0 and manifest["peak_rss_mb"] > 10
    assert set(manifest["versions"]) == {"torch", "transformers", "trl", "datasets", "accelerate", "peft", "python"}
    assert manifest["versions"]["torch"].startswith("2.")
    assert "git_commit" in manifest and manifest["started"] <= manifest["finished"]
    # The resolved recipe is saved and loads back to the same fingerprints.
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert expected_fingerprints(saved) == fingerprints


def test_changed_stage_reruns_it_and_downstream_only(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    run(path)
    old_a = read_manifest(tmp_path / "run" / "a")
    assert run(path, "stages.b.steps=3") == {"a": "skipped", "b": "ran", "c": "ran"}
    assert read_manifest(tmp_path / "run" / "a") == old_a
    assert read_manifest(tmp_path / "run" / "b")["config"]["steps"] == 3
    # b started from a clean folder: its finished outputs were not resumed from.
    assert calls(tmp_path)[-2] == {"stage": "b", "resumed_from": 0, "upstream": ["a"]}

    # Changing only the last stage re-runs only it.
    assert run(path, "stages.b.steps=3", "stages.c.tag=y") == {"a": "skipped", "b": "skipped", "c": "ran"}
    assert (tmp_path / "run" / "c" / "out.txt").read_text() == "xxy"


@pytest.mark.parametrize("override", ["run.seed=7", "model.teacher.train_from_scratch.hidden_size=32"])
def test_seed_or_model_change_reruns_everything(tmp_path, fake_stages, override):
    path = write_recipe(tmp_path)
    run(path)
    assert run(path, override) == {"a": "ran", "b": "ran", "c": "ran"}


def test_run_name_does_not_change_fingerprints(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    run(path)
    assert set(run(path, "run.name=renamed").values()) == {"skipped"}


def test_code_change_reruns_stage_and_downstream(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    run(path)
    source = fake_stages / "fake_stage_b.py"
    source.write_text(source.read_text() + "\n# a harmless edit still changes the code version\n")
    sys.modules.pop("fake_stage_b")
    states = inspect_run(load_recipe(path))
    assert states["b"].state == "stale" and "code" in states["b"].why
    assert run(path) == {"a": "skipped", "b": "ran", "c": "ran"}


def test_from_until_only(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    assert run(path, until="a") == {"a": "ran"}
    assert not (tmp_path / "run" / "b").exists()
    assert run(path) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert run(path, from_stage="b") == {"a": "skipped", "b": "ran", "c": "ran"}
    assert run(path, from_stage="b", until="b") == {"a": "skipped", "b": "ran"}
    # c was built from the b that --from b --until b just replaced: stale now.
    states = inspect_run(load_recipe(path))
    assert states["c"].state == "stale" and states["c"].why == "an upstream stage re-ran since"
    assert run(path) == {"a": "skipped", "b": "skipped", "c": "ran"}

    assert run(path, only="b") == {"b": "ran"}  # --only re-runs a finished stage
    assert inspect_run(load_recipe(path))["c"].state == "stale"


def test_only_refuses_when_upstream_not_done_and_writes_nothing(tmp_path, fake_stages):
    path = write_recipe(tmp_path)
    with pytest.raises(UserError, match=r"--only c: .*b \(pending\)"):
        run(path, only="c")
    assert not (tmp_path / "run").exists()

    run(path)
    before = snapshot(tmp_path / "run")
    with pytest.raises(UserError, match=r"--only c: .*b \(stale\)"):
        run(path, "stages.b.steps=1", only="c")
    assert snapshot(tmp_path / "run") == before


def test_selection_errors(tmp_path, fake_stages):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {}})
    with pytest.raises(UserError, match="--from c: not a stage of .*r.yaml"):
        run(path, from_stage="c")
    with pytest.raises(UserError, match="cannot be combined"):
        run(path, only="a", until="b")
    with pytest.raises(UserError, match="--until a comes before --from b"):
        run(path, from_stage="b", until="a")
    assert not (tmp_path / "run").exists()


def test_crash_then_resume(tmp_path, fake_stages):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {"steps": 3}, "c": {}})
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "crash-b-2").write_text("")
    with pytest.raises(RuntimeError, match="simulated crash of b at step 2"):
        run(path)
    assert read_manifest(run_dir / "b") is None and not (run_dir / "c").exists()
    assert not (run_dir / ".lock").exists()  # released on failure
    assert "b: failed after" in (run_dir / "run.log").read_text()
    states = inspect_run(load_recipe(path))
    assert [states[s].state for s in "abc"] == ["done", "interrupted", "pending"]
    assert states["b"].why == "no manifest; resumes"

    (run_dir / "crash-b-2").unlink()
    assert run(path) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert calls(tmp_path)[-2] == {"stage": "b", "resumed_from": 2, "upstream": ["a"]}  # kept its checkpoints
    assert read_manifest(run_dir / "b")["metrics"]["resumed_from"] == 2


def test_interrupted_attempt_with_other_config_is_wiped(tmp_path, fake_stages, caplog):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {"steps": 3}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "crash-b-2").write_text("")
    with pytest.raises(RuntimeError):
        run(path)
    (run_dir / "crash-b-2").unlink()
    assert inspect_run(load_recipe(path, ["stages.b.tag=other"]))["b"].why == "no manifest; made with other inputs: restarts clean"
    assert run(path, "stages.b.tag=other") == {"a": "skipped", "b": "ran"}
    assert calls(tmp_path)[-1]["resumed_from"] == 0  # the other config's step files were not used
    assert "wiping it instead of resuming" in caplog.text


def test_folder_without_manifest_is_not_done(tmp_path, fake_stages):
    path = write_recipe(tmp_path, stages={"a": {}})
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "out.txt").write_text("left over")
    assert inspect_run(load_recipe(path))["a"].state == "interrupted"
    assert run(path) == {"a": "ran"}
    assert (tmp_path / "run" / "a" / "out.txt").read_text() == "x"


def test_manifest_write_failure_leaves_stage_not_done(tmp_path, fake_stages, monkeypatch):
    """A crash between writing the manifest's temp file and the rename leaves no manifest."""
    path = write_recipe(tmp_path, stages={"a": {}})
    real_replace = os.replace

    def replace_failing_for_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr("pipeline.manifest.os.replace", replace_failing_for_manifest)
    with pytest.raises(OSError, match="disk full"):
        run(path)
    monkeypatch.setattr("pipeline.manifest.os.replace", real_replace)
    stage_dir = tmp_path / "run" / "a"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["attempt.json", "out.txt", "step-0", "step-1", "step-2"]
    assert inspect_run(load_recipe(path))["a"].state == "interrupted"
    assert run(path) == {"a": "ran"}
    assert calls(tmp_path)[-1]["resumed_from"] == 3  # same attempt: its outputs are reused


def test_lock_held_by_live_process_refuses(tmp_path, fake_stages):
    path = write_recipe(tmp_path, stages={"a": {}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            run(path)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run(path) == {"a": "ran"}  # the holder is dead now: stale lock taken over
    assert not (run_dir / ".lock").exists()


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    """A run killed while HF Trainer saved checkpoint-N leaves it without trainer_state.json
    (written last): resuming must use the previous, complete checkpoint."""
    from stages.context import ModelConfig, StageContext

    ctx = StageContext("teacher", tmp_path, tmp_path / "teacher", {}, ModelConfig())
    assert ctx.last_checkpoint() is None
    for step, state in ((4, "{}"), (8, '{"global_step": 8}'), (12, None), (16, '{"global_st')):
        folder = ctx.checkpoint_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert ctx.last_checkpoint() == ctx.checkpoint_dir / "checkpoint-8"


# ----------------------------------------------------------------------------------------------
# End to end with the real data and teacher stages (tiny: hidden 16, one layer, a few steps)

ROOT = Path(__file__).resolve().parents[1]


def write_real_recipe(folder: Path, run_dir: Path, max_steps: int = 12, save_steps: int = 4) -> Path:
    recipe = {
        "run": {"name": "e2e", "output_dir": str(run_dir), "seed": 0},
        "model": {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 1, "state_size": 4}}},
        "stages": {
            "data": {"source": {"synthetic": "arithmetic", "digits": [1, 2], "num_problems": 100},
                     "seq_len": 16, "rl_prompts": 8, "test_size": 10},
            "teacher": {"max_steps": max_steps, "batch_size": 4, "save_steps": save_steps, "logging_steps": 4,
                        "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4},
        },
    }
    path = folder / "tiny_real.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_real_stages_skip_rerun_and_force(tmp_path):
    run_dir = tmp_path / "run"
    path = write_real_recipe(tmp_path, run_dir)
    assert run(path) == {"data": "ran", "teacher": "ran"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "teacher")  # a stage output loads as is
    assert model.config.hidden_size == 16
    teacher = read_manifest(run_dir / "teacher")
    assert teacher["metrics"]["steps"] == 12 and "model.safetensors" in teacher["outputs"]

    assert run(path) == {"data": "skipped", "teacher": "skipped"}  # no work at all
    assert read_manifest(run_dir / "teacher") == teacher

    data = read_manifest(run_dir / "data")
    assert run(path, "stages.teacher.lr=1e-3") == {"data": "skipped", "teacher": "ran"}
    assert read_manifest(run_dir / "data") == data
    assert read_manifest(run_dir / "teacher")["config"]["lr"] == 0.001

    assert run(path, "stages.teacher.lr=1e-3", from_stage="teacher") == {"data": "skipped", "teacher": "ran"}
    assert read_manifest(run_dir / "teacher")["metrics"]["steps"] == 12  # trained from scratch, not "resumed" at the end


def _spikerl(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # same threads for both runs
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _complete_checkpoint(checkpoints: Path) -> Path | None:
    for folder in sorted(checkpoints.glob("checkpoint-*")):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return folder
        except (OSError, ValueError):
            continue
    return None


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """kill -9 the CLI once the teacher has written a checkpoint, run it again: it resumes (data
    skipped, teacher from the checkpoint) and ends with exactly the weights of an uninterrupted
    run with the same seed (HF Trainer checkpoints restore model, optimizer, scheduler, RNG and
    data position; all on CPU with one thread, so the arithmetic is the same)."""
    import time

    from safetensors.torch import load_file

    max_steps = 300  # long enough that the kill lands mid-training, short on CPU (~tens of ms a step)
    for folder in ("ref", "killed"):
        (tmp_path / folder).mkdir()
    reference = write_real_recipe(tmp_path / "ref", tmp_path / "ref" / "run", max_steps, save_steps=20)
    assert _spikerl("run", str(reference)).wait(timeout=300) == 0

    run_dir = tmp_path / "killed" / "run"
    path = write_real_recipe(tmp_path / "killed", run_dir, max_steps, save_steps=20)
    process = _spikerl("run", str(path))
    deadline = time.time() + 240
    while _complete_checkpoint(run_dir / "teacher" / "checkpoints") is None:
        assert process.poll() is None, f"the run ended before its first checkpoint: {process.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    process.kill()  # SIGKILL: no cleanup, no finally blocks
    process.wait()
    print("killed after", sorted(p.name for p in (run_dir / "teacher" / "checkpoints").iterdir()))
    assert read_manifest(run_dir / "teacher") is None, "the kill came too late: the teacher had finished"
    assert json.loads((run_dir / ".lock").read_text())["pid"] == process.pid  # left behind by the kill

    resumed = _spikerl("run", str(path))
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "taking over the stale lock" in stderr
    assert "data: skipped (done)" in stderr and "teacher: resuming the interrupted attempt from" in stderr

    expected = load_file(tmp_path / "ref" / "run" / "teacher" / "model.safetensors")
    got = load_file(run_dir / "teacher" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch_equal(expected[name], got[name]), name


def torch_equal(a, b) -> bool:
    import torch

    if not torch.equal(a, b):
        print("max abs difference", (a.float() - b.float()).abs().max().item())
        return False
    return True
