"""SIGKILL during each training stage at a (seeded) random step, then the same command again.

The re-run must resume: the stages before are skipped (their manifests untouched), the killed
stage continues from its newest complete checkpoint (at most `save_steps` steps redone), and every
manifest ends complete. While the killed stage's process is alive, a second run on the same
folder is refused naming its pid (two runs, one folder). One subprocess per training stage.
"""

from __future__ import annotations

import random
import shutil
import signal
import time

import pytest

from pipeline.__main__ import main
from pipeline.manifest import read_manifest
from tests.faults.helpers import (
    TRAINING_STAGES,
    assert_manifest_complete,
    complete_checkpoints,
    copy_run,
    finished_run,
    kill_at_step,
    logged_step,
    max_steps,
    save_steps,
    spikerl,
)

UPSTREAM = {"teacher": ["data"], "distill": ["data", "teacher"], "sparsify": ["data", "teacher", "distill"],
            "rl": ["data", "teacher", "distill", "sparsify"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_sigkill_at_a_random_step_then_rerun_resumes(stage, tmp_path, tmp_path_factory, capsys):
    recipe, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    for name in TRAINING_STAGES[TRAINING_STAGES.index(stage):]:
        shutil.rmtree(run_dir / name, ignore_errors=True)  # the template finished it: start from nothing
    upstream_before = {name: read_manifest(run_dir / name) for name in UPSTREAM[stage]}

    # a random step after the first checkpoint and before the end (seeded per stage: reproducible)
    kill_step = random.Random(f"kill-{stage}").randint(save_steps(stage) + 1, max_steps(stage) - 3)
    child = spikerl("run", str(recipe), "--until", stage)
    try:
        while logged_step(run_dir / stage) < 1:  # the child holds the lock once it trains
            assert child.poll() is None, child.stderr.read()
            time.sleep(0.005)
        if stage == "teacher":  # two runs on one folder: the second one is refused with the holder's pid
            # paused while the second run plans (its code hashing takes longer than the tiny teacher's
            # remaining steps on a fast machine: the child could finish and free the lock first)
            child.send_signal(signal.SIGSTOP)
            try:
                assert child.poll() is None and logged_step(run_dir / stage) < max_steps(stage), "the child had finished"
                assert main(["run", str(recipe)]) == 2
                assert f"in use by pid {child.pid}" in capsys.readouterr().err
            finally:
                child.send_signal(signal.SIGCONT)
        killed_at = kill_at_step(child, run_dir / stage, kill_step)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert read_manifest(run_dir / stage) is None, "the kill came too late: the stage had finished"
    resume_from = max(complete_checkpoints(run_dir / stage), default=0)
    print(f"{stage}: killed after step {killed_at} (target {kill_step}), newest complete checkpoint {resume_from}")
    assert resume_from > 0, "no checkpoint to resume from: the kill came before the first save"

    assert main(["run", str(recipe), "--until", stage]) == 0
    log = (run_dir / "run.log").read_text()
    for name in UPSTREAM[stage]:
        assert f"{name}: skipped (done)" in log
        assert read_manifest(run_dir / name) == upstream_before[name]  # not redone from zero
    assert f"{stage}: resuming the interrupted attempt from {run_dir / stage / 'checkpoints' / f'checkpoint-{resume_from}'}" in log
    redone = killed_at - resume_from
    assert 0 <= redone <= save_steps(stage), f"{redone} steps redone, save_steps {save_steps(stage)}"

    manifest = assert_manifest_complete(run_dir, stage)
    assert manifest["metrics"]["steps"] == max_steps(stage)
    for name in UPSTREAM[stage]:
        assert_manifest_complete(run_dir, name)
    assert not (run_dir / ".lock").exists()
