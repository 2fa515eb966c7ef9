"""A corrupted file is refused before anything runs, with the file named and the command that fixes it.

* a finished stage's output truncated (distill/model.safetensors): the next stage that would read
  it is not started; the message names the file and says `spikerl run RECIPE --from distill`;
* the checkpoint an interrupted stage would resume from truncated (model.safetensors or the
  torch.save optimizer state): the message names the file, `--from teacher` (restart the stage)
  and the checkpoint to delete (resume from the one before).

In both cases the run folder is left exactly as it was, and following the hint works.
"""

from __future__ import annotations

import os

import pytest

from pipeline.__main__ import main
from pipeline.manifest import read_manifest
from tests.faults.helpers import assert_manifest_complete, copy_run, finished_run, snapshot


def truncate(path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def test_truncated_upstream_output_names_the_file_and_the_fix(tmp_path, tmp_path_factory, capsys):
    recipe, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    damaged = run_dir / "distill" / "model.safetensors"
    truncate(damaged)
    before = snapshot(run_dir)

    assert main(["run", str(recipe), "--until", "rl"]) == 2  # rl would read sparsify, built on distill
    err = capsys.readouterr().err
    print(err)
    assert str(damaged) in err and f"spikerl run {recipe} --from distill" in err
    assert "Traceback" not in err
    assert snapshot(run_dir) == before

    assert main(["run", str(recipe), "--from", "distill", "--until", "distill"]) == 0  # the hint works
    assert_manifest_complete(run_dir, "distill")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_truncated_resume_checkpoint_names_the_file_and_the_fix(name, tmp_path, tmp_path_factory, capsys):
    recipe, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    (run_dir / "teacher" / "manifest.json").unlink()  # the teacher was "interrupted" after its last checkpoint
    checkpoint = run_dir / "teacher" / "checkpoints" / "checkpoint-60"
    truncate(checkpoint / name)
    before = snapshot(run_dir)

    assert main(["run", str(recipe), "--until", "teacher"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert str(checkpoint / name) in err
    assert f"spikerl run {recipe} --from teacher" in err and f"delete {checkpoint}" in err
    assert snapshot(run_dir) == before

    assert main(["run", str(recipe), "--from", "teacher", "--until", "teacher"]) == 0  # restarts clean
    manifest = assert_manifest_complete(run_dir, "teacher")
    assert manifest["metrics"]["steps"] == 60
    assert "teacher: forced: wiping the interrupted attempt" in (run_dir / "run.log").read_text()
    assert read_manifest(run_dir / "data") is not None
