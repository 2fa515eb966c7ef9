"""What every stage receives from the runner, and the recipe's `model:` section.

A stage is a module `stages/<name>.py` with

    class Config(pydantic.BaseModel)          # its `stages.<name>:` recipe section
    def run(cfg: Config, ctx: StageContext) -> dict   # metrics for the manifest

The runner (pipeline/runner.py) builds the context; nothing here imports the pipeline, so a stage
can also be called from a notebook with a hand-made context.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def local_path(default: Any = None, *, kind: Literal["file", "folder"], description: str) -> Any:
    """A recipe field that names a local file or folder (relative to the current directory).

    The runner's preflight checks every such field of every stage that will run
    (`check_local_paths`) before the run folder is touched, so a missing path fails first, not
    after the training stages. A field that may also be a hub id is not one of these.
    """
    return Field(default, description=description, json_schema_extra={"local_path": kind})


# Keys of the `trainer:` / `trl:` passthrough dicts that name a local file (TrainingArguments.deepspeed)
PASSTHROUGH_PATHS = {"deepspeed": "file"}


def _path_problem(dotted: str, path: Any, kind: str) -> str | None:
    exists = Path(path).is_file() if kind == "file" else Path(path).is_dir()
    return None if exists else f"{dotted}: {path} is not a {kind} (relative to {Path.cwd()})"


def check_local_paths(cfg: BaseModel, where: str) -> list[str]:
    """Problems with the `local_path` fields of `cfg` and its nested sections ([] when all exist),
    and with a `deepspeed: <json file>` in a passthrough dict.

    Each problem names the dotted field and the path: `stages.eval.lm_eval_include_path: x is not
    a folder (relative to /cwd)`.
    """
    problems: list[str | None] = []
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        dotted = f"{where}.{name}"
        if extra.get("local_path") is not None and value is not None:
            problems += [_path_problem(dotted, path, extra["local_path"]) for path in (value if isinstance(value, list) else [value])]
        if isinstance(value, dict):
            problems += [
                _path_problem(f"{dotted}.{key}", value[key], kind)
                for key, kind in PASSTHROUGH_PATHS.items()
                if isinstance(value.get(key), str)
            ]
        for child in value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]:
            if isinstance(child, BaseModel):
                problems += check_local_paths(child, dotted)
    return [problem for problem in problems if problem is not None]


def checkpoint_folders(folder: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N/` folders under `folder` as (N, path), oldest first ([] if none)."""
    if not Path(folder).is_dir():
        return []
    found = []
    for path in Path(folder).iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(folder: Path, logger: logging.Logger | None = None) -> Path | None:
    """Newest `checkpoint-N/` under `folder` whose `trainer_state.json` parses, or None.

    HF Trainer (and the PPO trainer) write that file last, so a run killed while saving
    checkpoint-N leaves it without one, and the checkpoint before it is used.
    """
    for _, path in reversed(checkpoint_folders(folder)):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            if logger is not None:
                logger.warning("ignoring the incomplete checkpoint %s", path)
            continue
        return path
    return None


class HubRepo(StrictModel):
    """`push_to_hub:` of a model stage: after the stage (its model folder and card written, before
    its manifest) the folder goes to this hub repo through huggingface_hub's `create_repo` +
    `upload_folder`. Part of the stage's config, so of its fingerprint: set it before the run (a
    finished folder can be pushed by hand: `hf upload REPO run_dir/<stage> --exclude 'checkpoints/*'`)."""

    repo_id: str = Field(description="hub repo, 'user/name' or 'org/name' (created when missing); no default")
    private: bool = Field(True, description="create the repo private (true) or public; an existing repo keeps its visibility")

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str) -> str:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError as error:
            raise ValueError(str(error)) from None
        return value


def push_to_hub_field() -> Any:
    """The `push_to_hub` field every model stage's Config has (off by default)."""
    return Field(None, description="push the model folder to the hub after the stage: {repo_id, private} (None: no push)")


class TeacherArch(StrictModel):
    """Architecture of a teacher trained from scratch: a Mamba (HF `MambaConfig` fields) or, with
    `architecture: llama`, a small Transformer (HF `LlamaConfig` fields)."""

    architecture: Literal["mamba", "llama"] = Field(
        "mamba", description="mamba: MambaForCausalLM; llama: LlamaForCausalLM (attention, RoPE, gated SiLU MLP)"
    )
    hidden_size: int = Field(128, ge=8, description="residual width d_model")
    num_hidden_layers: int = Field(4, ge=1, description="number of blocks")
    state_size: int = Field(16, ge=1, description="mamba: SSM state size N")
    expand: int = Field(2, ge=1, description="mamba: d_inner = expand * hidden_size")
    conv_kernel: int = Field(4, ge=1, description="mamba: causal conv1d width")
    intermediate_size: int | None = Field(
        None, ge=1, description="gated MLP width after each mixer (mamba: None = plain Mamba, no MLP; "
        "llama: None = 4 * hidden_size)"
    )
    num_attention_heads: int = Field(4, ge=1, description="llama: query heads (hidden_size must divide by it)")
    num_key_value_heads: int | None = Field(
        None, ge=1, description="llama: key/value heads (None = num_attention_heads; fewer = grouped-query attention)"
    )
    max_position_embeddings: int = Field(2048, ge=1, description="llama: longest context RoPE is set up for")

    @model_validator(mode="after")
    def _fields_of_one_architecture(self):
        attention_fields = {"num_attention_heads", "num_key_value_heads", "max_position_embeddings"}
        mamba_fields = {"state_size", "expand", "conv_kernel"}
        # a value other than the default (a resolved recipe writes every field, defaults included)
        foreign = {
            name for name in (attention_fields if self.architecture == "mamba" else mamba_fields)
            if getattr(self, name) != type(self).model_fields[name].default
        }
        if foreign:
            raise ValueError(f"{sorted(foreign)[0]} does not apply to architecture {self.architecture!r}")
        if self.architecture == "llama":
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} must divide by num_attention_heads {self.num_attention_heads}")
            kv = self.num_key_value_heads or self.num_attention_heads
            if self.num_attention_heads % kv:
                raise ValueError(f"num_attention_heads {self.num_attention_heads} must divide by num_key_value_heads {kv}")
        return self


class TeacherSource(StrictModel):
    """Where the teacher comes from: exactly one of `pretrained` or `train_from_scratch`."""

    pretrained: str | None = Field(
        None, description="hub id (state-spaces/mamba-130m-hf) or a local folder: an HF Mamba, or a Llama-layout Transformer"
    )
    train_from_scratch: TeacherArch | None = Field(
        None, description="architecture of a small Mamba (or Llama) trained on the data stage's corpus"
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
    scan_backend: Literal["auto", "ref", "cpu", "triton", "mamba_ssm"] = Field(
        "auto",
        description="selective-scan kernel; auto = mamba_ssm on CUDA if installed, else triton on CUDA; on CPU the "
        "C++ scan ('cpu'), or the PyTorch reference ('ref') where it cannot be built",
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
        path = self.out_dir / "pre_training_metrics.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps(saved | values))

    def recorded_before_training(self) -> dict[str, Any]:
        """What `record_before_training` kept for this stage's attempt ({} if nothing)."""
        path = self.out_dir / "pre_training_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def checkpoint_dir(self) -> Path:
        """Where HF Trainer checkpoints (`checkpoint-N/`) of this stage go."""
        return self.out_dir / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        """Newest complete `checkpoint-N/` of an interrupted earlier attempt, or None
        (`last_complete_checkpoint` of `checkpoint_dir`)."""
        return last_complete_checkpoint(self.checkpoint_dir, self.logger)
