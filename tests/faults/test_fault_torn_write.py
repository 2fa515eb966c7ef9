"""SIGKILL in the middle of a checkpoint write, of the stage's final model write, and of the
manifest write: the stage is never marked done over partial files, and each re-run goes on from
the last whole state.

Three kills of one teacher run (tests/faults/child.py installs each), then a clean re-run:

1. half of checkpoint-20/model.safetensors on disk -> checkpoint-20 has no trainer_state.json
   (HF writes it last): the next run resumes from checkpoint-10;
2. half of the final teacher/model.safetensors on disk -> no manifest; the next run resumes from
   the last checkpoint (nothing left to train) and writes the model again;
3. the manifest's temp file written, killed before the rename -> still no manifest.json.
"""

from __future__ import annotations

import pytest

from pipeline.__main__ import main
from pipeline.manifest import check_output_file, read_manifest
from tests.faults.helpers import TINY_STAGES, assert_manifest_complete, complete_checkpoints, spikerl, write_recipe


def run_child(fault: str, recipe) -> None:
    child = spikerl("run", str(recipe), fault=fault)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -9, f"the fault {fault} did not fire (exit {child.returncode}): {stderr}"


@pytest.mark.slow
def test_kills_during_writes_never_leave_a_stage_done_with_partial_files(tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, run_dir, stages={name: TINY_STAGES[name] for name in ("data", "teacher")})
    teacher = run_dir / "teacher"

    # 1. torn checkpoint
    run_child("safetensors:teacher/checkpoints/checkpoint-20/model.safetensors", recipe)
    assert read_manifest(teacher) is None
    assert check_output_file(teacher / "checkpoints" / "checkpoint-20" / "model.safetensors") is not None  # torn
    assert complete_checkpoints(teacher) == [10]

    # 2. torn final model: the run resumed from checkpoint-10, trained to the end, died saving
    run_child("safetensors:teacher/model.safetensors", recipe)
    assert read_manifest(teacher) is None
    assert check_output_file(teacher / "model.safetensors") is not None
    assert complete_checkpoints(teacher)[-1] == TINY_STAGES["teacher"]["max_steps"]

    # 3. killed between the manifest's temp file and its rename
    run_child("manifest:teacher", recipe)
    assert read_manifest(teacher) is None
    assert list(teacher.glob(".manifest.json.tmp-*")), "the kill should have come after the temp file was written"
    assert check_output_file(teacher / "model.safetensors") is None  # the re-run rewrote it whole

    assert main(["status", str(recipe)]) == 0
    assert main(["run", str(recipe)]) == 0
    manifest = assert_manifest_complete(run_dir, "teacher")
    assert manifest["metrics"]["steps"] == TINY_STAGES["teacher"]["max_steps"]
    assert not any(name.startswith(".manifest") for name in manifest["outputs"])
    assert main(["run", str(recipe)]) == 0  # and now it is done: skipped, manifest untouched
    assert read_manifest(teacher) == manifest
