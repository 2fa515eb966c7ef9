"""NaN loss: the stage stops at the step whose loss is nan, naming it, and keeps the last good checkpoint.

The fault: a callback sets one weight to nan at the start of a chosen step (a diverged update
looks the same), so that step's real forward gives a nan loss. The runner's
`StopOnNonFiniteLoss` (stages/teacher.py, given to every stage) must stop before the optimizer
step, so no checkpoint holds nan weights and the error names the step and the checkpoint kept.
Teacher (HF Trainer) and distill (its own compute_loss) both.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import pipeline.runner
from pipeline.manifest import read_manifest
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from stages.training import NonFiniteLossError
from tests.faults.helpers import complete_checkpoints, copy_run, finished_run


class PoisonWeights(TrainerCallback):
    """Sets the embedding's first row to nan when step `step` + 1 begins."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_input_embeddings().weight[:].fill_(float("nan"))


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(stage, tmp_path, tmp_path_factory, monkeypatch):
    recipe_path, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    shutil.rmtree(run_dir / stage)  # this stage trains again, from nothing
    real_guard = pipeline.runner._guard_callbacks
    monkeypatch.setattr(pipeline.runner, "_guard_callbacks", lambda name: [*real_guard(name), PoisonWeights(25)])

    with pytest.raises(NonFiniteLossError, match=rf"{stage}: step 26: loss is nan") as raised:
        run_recipe(load_recipe(recipe_path), until=stage)
    good = run_dir / stage / "checkpoints" / "checkpoint-20"
    assert str(good) in str(raised.value)
    assert read_manifest(run_dir / stage) is None
    assert complete_checkpoints(run_dir / stage) == [10, 20]  # no checkpoint after the bad step
    for step in (10, 20):
        for name, tensor in load_file(run_dir / stage / "checkpoints" / f"checkpoint-{step}" / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), f"checkpoint-{step} {name}"
