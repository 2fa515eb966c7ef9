"""Disk full: a write that raises OSError(ENOSPC) in the middle of a stage.

The stage fails with the OSError, is not marked done, the finished stages before it are
byte-for-byte unchanged, its own earlier checkpoints are intact, the lock is released, and once
there is space again the same command resumes from the last whole checkpoint.
"""

from __future__ import annotations

import errno

import pytest
import transformers.modeling_utils

from pipeline.__main__ import main
from pipeline.manifest import read_manifest
from tests.faults.helpers import TINY_STAGES, assert_manifest_complete, complete_checkpoints, snapshot, write_recipe


def test_disk_full_during_a_checkpoint_fails_the_stage_and_keeps_the_previous_state(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, run_dir, stages={name: TINY_STAGES[name] for name in ("data", "teacher")})
    assert main(["run", str(recipe), "--until", "data"]) == 0
    data_before = snapshot(run_dir / "data")

    real_save = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "checkpoint-30" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    with pytest.raises(OSError, match="No space left on device"):
        main(["run", str(recipe)])
    teacher = run_dir / "teacher"
    assert read_manifest(teacher) is None
    assert snapshot(run_dir / "data") == data_before and read_manifest(run_dir / "data") is not None
    assert complete_checkpoints(teacher) == [10, 20]
    assert not (run_dir / ".lock").exists()
    assert "teacher: failed after" in (run_dir / "run.log").read_text()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)  # space again
    assert main(["run", str(recipe)]) == 0
    assert f"resuming the interrupted attempt from {teacher / 'checkpoints' / 'checkpoint-20'}" in (run_dir / "run.log").read_text()
    assert assert_manifest_complete(run_dir, "teacher")["metrics"]["steps"] == 60
    assert snapshot(run_dir / "data") == data_before
