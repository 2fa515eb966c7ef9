"""What every stage receives from the runner, and the recipe's `model:` section.

A stage is a module `stages/<name>.py` with

    class Config(pydantic.BaseModel)          # its `stages.<name>:` recipe section
    def run(cfg: Config, ctx: StageContext) -> dict   # metrics for the manifest

The runner (pipeline/runner.py) builds the context; nothing here imports the pipeline, so a stage
can also be called from a notebook with a hand-made context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherArch(StrictModel):
    """Architecture of a Mamba teacher trained from scratch (HF `MambaConfig` fields)."""

    hidden_size: int = Field(128, ge=8, description="residual width d_model")
    num_hidden_layers: int = Field(4, ge=1, description="number of Mamba blocks")
    state_size: int = Field(16, ge=1, description="SSM state size N")
    expand: int = Field(2, ge=1, description="d_inner = expand * hidden_size")
    conv_kernel: int = Field(4, ge=1, description="causal conv1d width")
    intermediate_size: int | None = Field(
        None, ge=1, description="gated MLP width after each mixer (None = plain Mamba, no MLP)"
    )


class TeacherSource(StrictModel):
    """Where the teacher comes from: exactly one of `pretrained` or `train_from_scratch`."""

    pretrained: str | None = Field(
        None, description="hub id (state-spaces/mamba-130m-hf) or a local folder with an HF Mamba"
    )
    train_from_scratch: TeacherArch | None = Field(
        None, description="architecture of a small Mamba trained on the data stage's corpus"
    )


class ModelConfig(StrictModel):
    """The recipe's top-level `model:` section, shared by the stages that build models."""

    teacher: TeacherSource = Field(
        default_factory=lambda: TeacherSource(train_from_scratch=TeacherArch()),
        description="the Mamba teacher: pretrained or trained from scratch",
    )
    tokenizer: str | None = Field(
        None, description="hub id or folder of the tokenizer (None: the teacher's, or the data stage's built one)"
    )
    scan_backend: Literal["auto", "ref", "triton", "mamba_ssm"] = Field(
        "auto", description="selective-scan kernel; auto = mamba_ssm on CUDA if installed, else reference"
    )
    trust_remote_code: bool = Field(False, description="allow code from the hub when loading models")


@dataclass
class StageContext:
    """Everything a stage needs from the run, besides its own config.

    out_dir:     this stage's folder, `run_dir/<stage>/` (exists; may hold checkpoints of an
                 interrupted earlier attempt: resume from them).
    upstream:    output folders of the stages before this one in the recipe, by name
                 (`ctx.upstream["data"]`); only finished stages appear.
    """

    stage: str
    run_dir: Path
    out_dir: Path
    upstream: dict[str, Path]
    model: ModelConfig
    seed: int = 0
    is_main_process: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("spikerl"))
    extra: dict[str, Any] = field(default_factory=dict)

    def need(self, name: str) -> Path:
        """The output folder of upstream stage `name`, or a clear error if the recipe lacks it."""
        if name not in self.upstream:
            raise ValueError(
                f"stage '{self.stage}' needs the output of stage '{name}', which is not in this "
                f"recipe or has not finished (upstream: {sorted(self.upstream) or 'none'})"
            )
        return self.upstream[name]

    def record_before_training(self, values: dict[str, Any]) -> None:
        """Keep figures measured before the first step (e.g. the converted student's accuracy)
        beside the checkpoints, so a resumed attempt can still report them."""
        import json

        path = self.out_dir / "pre_training_metrics.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps(saved | values))

    def recorded_before_training(self) -> dict[str, Any]:
        """What `record_before_training` kept for this stage's attempt ({} if nothing)."""
        import json

        path = self.out_dir / "pre_training_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def checkpoint_dir(self) -> Path:
        """Where HF Trainer checkpoints (`checkpoint-N/`) of this stage go."""
        return self.out_dir / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        """Newest complete `checkpoint-N/` of an interrupted earlier attempt, or None.

        Complete = its `trainer_state.json` parses: HF Trainer writes that file last, so a run
        killed while saving checkpoint-N leaves it without one and the previous checkpoint is used.
        """
        import json
        import re

        if not self.checkpoint_dir.is_dir():
            return None
        steps = {}
        for path in self.checkpoint_dir.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if match and path.is_dir():
                steps[int(match.group(1))] = path
        for step in sorted(steps, reverse=True):
            try:
                json.loads((steps[step] / "trainer_state.json").read_text())
            except (OSError, ValueError):
                self.logger.warning("%s: ignoring the incomplete checkpoint %s", self.stage, steps[step])
                continue
            return steps[step]
        return None
