"""The training toolkit the stages share: the HF `Trainer` as this project drives it.

No stage lives here; teacher, distill, sparsify and rl import what they need:

* `TrainerKnobs`, `build_training_args`, `check_trainer_keys`: a stage's typed Trainer knobs and
  the deterministic `TrainingArguments` built from them (the `trainer:` passthrough checked).
* `collate_blocks`, `stage_callbacks` (`JsonLogCallback` + the runner's guards such as
  `StopOnNonFiniteLoss`), `train_or_load` (train, resume, or load a checkpoint that already holds
  every step), `load_checkpoint_weights`.
* `load_compute_teacher`, `check_vocab`: the frozen teacher a student learns from.
* `SGCConfig`, `sgc_lambda`, `SGCSchedule` (methods.md §3) and `TeacherStudentTrainer`, the base of
  the distill and sparsify trainers (loss-term averaging, firing-rate and λ logging), with
  `head_logits_sums`: the KD / SBDS vocabulary terms computed chunk by chunk over tokens, from the
  final hidden states through each model's LM head (methods.md §4, bounded memory).
* `deepspeed_off`, `is_zero3_partitioned`, `gathered`: rank 0 evaluating alone after a ZeRO-3 stage.

    from stages.training import TrainerKnobs, build_training_args, train_or_load
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from datasets import Dataset, DatasetDict, interleave_datasets
from pydantic import Field, field_validator
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import spiking
from stages.context import StageContext, StrictModel, last_complete_checkpoint

# Recipe fields that set a TrainingArguments field: the `trainer:` passthrough may not set these
# (one knob, one place), nor the ones the run owns (output_dir, seed, data_seed).
OWNED_TRAINING_ARGS = {
    "max_steps": "max_steps",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_steps": "warmup_ratio",
    "lr_scheduler_type": "lr_scheduler",
    "weight_decay": "weight_decay",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "save_total_limit": "save_total_limit",
    "output_dir": None,
    "seed": None,
    "data_seed": None,
}


def check_trainer_keys(trainer: dict[str, Any], section: str = "trainer") -> dict[str, Any]:
    """Every key of a `trainer:` passthrough must be a TrainingArguments field the stage does not own."""
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in trainer:
        if key not in known:
            raise ValueError(f"{section}.{key}: not a transformers TrainingArguments field")
        if key in OWNED_TRAINING_ARGS:
            owner = OWNED_TRAINING_ARGS[key]
            where = f"set it with the stage's `{owner}` field" if owner else "the run sets it (run.seed / run.output_dir)"
            raise ValueError(f"{section}.{key}: {where}, not through {section}")
    return trainer


class TrainerKnobs(StrictModel):
    """The HF Trainer knobs every training stage has (`build_training_args` reads them).

    A stage's Config extends this and redeclares only the fields whose default differs.
    """

    max_steps: int = Field(400, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    batch_size: int = Field(32, ge=1, description="packed blocks per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation: a larger batch at the same memory")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warmup")
    lr_scheduler: str = Field("cosine", description="HF scheduler name: cosine, linear, constant_with_warmup …")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    save_steps: int = Field(100, ge=1, description="checkpoint every N steps: the resume point after a crash")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk (oldest deleted)")
    logging_steps: int = Field(20, ge=1, description="log losses every N steps (also to train_log.json)")
    eval_samples: int = Field(200, ge=1, description="held-out prompts scored for the accuracy metric")
    eval_blocks: int = Field(16, ge=1, description="held-out corpus blocks for perplexity (and energy)")
    eval_batch_size: int = Field(64, ge=1, description="prompts / blocks per evaluation forward")
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="any other TrainingArguments field, passed through (e.g. bf16, optim)"
    )

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trainer_keys(value)


def task_share_field() -> Any:
    """The `task_share` knob of the KD stages (distill, sparsify): one description for both."""
    return Field(
        0.0, ge=0, lt=1, description="fraction of the training blocks drawn from the worked task examples alone "
        "(corpus/task, written when stages.data.task_in_corpus is set), on top of those already in the corpus: "
        "more of the KD signal on the task's answers (measured worse on recipes/small.yaml, README); "
        "0: the corpus as the teacher saw it",
    )


def kd_training_blocks(corpus: DatasetDict, task_share: float, seed: int, stage: str) -> Dataset:
    """The blocks a KD stage trains on: the corpus's training blocks, or with `task_share` > 0 a
    seeded mix in which that share of the draws comes from corpus/task (the worked examples,
    repeated as needed; `datasets.interleave_datasets`, every block of both seen at least once)."""
    if not task_share:
        return corpus["train"]
    if "task" not in corpus or len(corpus["task"]) == 0:
        raise ValueError(
            f"stages.{stage}.task_share={task_share} needs the worked task examples the data stage writes to corpus/task: "
            "set stages.data.task_in_corpus (with a prompt_source), or task_share: 0"
        )
    return interleave_datasets(
        [corpus["train"], corpus["task"]], probabilities=[1 - task_share, task_share], seed=seed,
        stopping_strategy="all_exhausted",
    )


def build_training_args(cfg: TrainerKnobs, ctx: StageContext, **overrides) -> TrainingArguments:
    """TrainingArguments from a stage config with the common knobs (max_steps, lr, batch_size, …).

    Deterministic by construction: seed and data_seed from the run, no dataloader workers, so an
    interrupted run resumed from a checkpoint ends with the same weights as an uninterrupted one.
    """
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.checkpoint_dir),
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of max_steps
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=ctx.seed,
        data_seed=ctx.seed,
        dataloader_num_workers=0,  # workers reseed per process: keep the data order in this one
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
    )
    kwargs.update(check_trainer_keys(dict(cfg.trainer)))
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Packed blocks all have seq_len tokens: stack them [B, L]; labels = inputs (the model shifts)."""
    input_ids = torch.stack([torch.as_tensor(row["input_ids"]) for row in rows])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# ------------------------------------------------------------------------------------ callbacks


class JsonLogCallback(TrainerCallback):
    """Writes the trainer's log history to `path` (JSON) at every log: readable without TensorBoard.

    The history is restored from the checkpoint on resume, so the file never holds steps that were
    undone by a crash.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state.log_history, indent=1))
            tmp.replace(self.path)


class NonFiniteLossError(RuntimeError):
    """Training produced a nan / inf loss; the message names the stage, the step and the last good checkpoint."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training at the first step whose loss is nan or inf, before the optimizer applies it.

    HF Trainer by default hides such steps from the logged loss (`logging_nan_inf_filter`) and goes
    on training on nan weights. A nan / inf loss makes its gradients non-finite, and the gradients
    are what this callback can see on every step (`on_pre_optimizer_step`, after backward, before
    `optimizer.step`): so the weights never take the bad step and the checkpoints on disk (all
    from earlier steps) stay good. A logged loss that is not finite (a trainer without gradients
    on `.grad`, e.g. DeepSpeed) stops the run too. The runner gives it to every stage through
    `ctx.extra["callbacks"]`; the error says which checkpoint a re-run resumes from.
    """

    def __init__(self, stage: str):
        self.stage = stage

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
        if not bool(finite.all()):
            has_nan = any(bool(torch.isnan(g).any()) for g in grads)
            self._stop(args, state.global_step + 1, "nan" if has_nan else "inf", "its gradients are not finite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            self._stop(args, state.global_step, str(loss), "the logged loss")

    def _stop(self, args, step: int, value: str, evidence: str) -> None:
        good = last_complete_checkpoint(Path(args.output_dir))
        kept = f"the last good checkpoint {good} is kept and a re-run resumes from it" if good else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{self.stage}: step {step}: loss is {value} ({evidence}); stopped before the optimizer step; {kept}. "
            f"Lower stages.{self.stage}.lr (or the trl learning_rate), or clip gradients (trainer.max_grad_norm)"
        )


def stage_callbacks(ctx: StageContext, *own: TrainerCallback) -> list[TrainerCallback]:
    """A stage trainer's callbacks: its own, the train_log.json writer, then what the runner adds in
    `ctx.extra["callbacks"]` (StopOnNonFiniteLoss; profilers or tests that stop a run)."""
    return [*own, JsonLogCallback(ctx.out_dir / "train_log.json"), *ctx.extra.get("callbacks", [])]


# ------------------------------------------------------------------------------ train or resume


def warn_if_checkpoint_disagrees(checkpoint: Path, args: Any, ctx: StageContext) -> None:
    """Say out loud when the recipe changed since the checkpoint was written (the run goes on)."""
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return
    saved = json.loads(state_file.read_text())
    now = {"max_steps": args.max_steps, "train_batch_size": args.per_device_train_batch_size}
    for key, value in now.items():
        if key in saved and saved[key] != value:
            ctx.logger.warning(
                "%s: resuming from %s written with %s=%s, the recipe now says %s", ctx.stage, checkpoint, key, saved[key], value
            )


def train_or_load(trainer, resume: Path | None, ctx: StageContext, load=None) -> dict[str, Any]:
    """Train (from `resume`, or from scratch), or load `resume` when it already holds every step.

    Returns {"train_loss", "steps", "log_history"}. `load(model, checkpoint)` puts a checkpoint's
    weights into the model (default: `load_checkpoint_weights`; rl passes its LoRA-aware loader).
    A resume is logged, with a warning when the recipe's steps or batch size changed since.
    """
    if resume is not None:
        ctx.logger.info("%s: resuming from %s", ctx.stage, resume)
        warn_if_checkpoint_disagrees(resume, trainer.args, ctx)
    finished = finished_training(resume, trainer.args.max_steps)
    if finished is not None:  # killed after the last checkpoint, before the outputs were written
        ctx.logger.info(
            "%s: %s already holds all %d steps: loading it instead of training", ctx.stage, resume, trainer.args.max_steps
        )
        (load or load_checkpoint_weights)(trainer.model, resume)
        return finished
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return {"train_loss": result.training_loss, "steps": result.global_step, "log_history": trainer.state.log_history}


def finished_training(checkpoint: Path | None, max_steps: int) -> dict[str, Any] | None:
    """{train_loss, steps, log_history} if `checkpoint` already reached max_steps, else None.

    HF Trainer resumed from such a checkpoint still takes at least one more optimizer step (it
    checks the step budget only after a step), so a stage killed between its last checkpoint and
    its manifest would end with max_steps + 1 steps and other weights than an uninterrupted run.
    Stages call this first and, when it answers, load the checkpoint's weights instead of training.
    train_loss is then the mean of the logged losses (the checkpoint does not hold Trainer's exact average).
    """
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    if state.get("global_step", 0) < max_steps:
        return None
    history = state.get("log_history", [])
    losses = [entry["loss"] for entry in history if isinstance(entry.get("loss"), (int, float))]
    return {
        "train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "steps": state["global_step"],
        "log_history": history,
    }


def load_checkpoint_weights(model, checkpoint: Path) -> None:
    """Load a Trainer checkpoint's model weights (one safetensors file or an index of shards) into `model`."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    checkpoint = Path(checkpoint)
    if (checkpoint / "model.safetensors").is_file():
        missing, unexpected = model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | {"lm_head.weight"}
        if unexpected or set(missing) - tied:
            raise ValueError(f"{checkpoint}/model.safetensors does not fit the model: missing {missing}, unexpected {unexpected}")
    else:
        load_sharded_checkpoint(model, str(checkpoint), strict=False)


# ------------------------------------------------------------------------------ the frozen teacher


def load_compute_teacher(teacher_dir: Path, ctx: StageContext, dtype: str = "float32"):
    """The teacher stage's output, frozen in eval mode, on the compute device, for distillation.

    A Mamba is loaded into the project's mixer with no neurons (`from_teacher(..., neurons={})`):
    the same numbers as HF Mamba and a faster CPU scan. A Transformer teacher is loaded as it is
    (transformers' own class); `block_outputs` reads either's hidden states.
    """
    if spiking.is_transformer(teacher_dir):
        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), trust_remote_code=ctx.model.trust_remote_code)
    else:
        model = spiking.from_teacher(str(teacher_dir), neurons={}, scan_backend=ctx.model.scan_backend)
    model.to(dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    model.requires_grad_(False)
    return model


def check_vocab(model, tokenizer, where: str) -> None:
    """A model must have an embedding row for every token id the tokenizer can produce."""
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"{where}: the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens: the data stage's tokenizer does not belong to this model"
        )


# ------------------------------------------------------------------------------ SGC (methods.md §3)


class SGCConfig(StrictModel):
    """Smoothed gradient compensation: y = (1-λ)·s·V + λ·x, λ annealed to 0 (training only)."""

    lambda0: float = Field(0.5, ge=0, le=1, description="λ at step 0: more = smoother early gradients, bigger train/deploy gap")
    anneal: float = Field(0.8, gt=0, le=1, description="fraction of steps over which λ falls to 0; the rest trains pure spikes")


def sgc_lambda(step: int, max_steps: int, sgc: SGCConfig | Literal[False]) -> float:
    """λ at optimizer step `step`: linear λ0 → 0 over the first `anneal·max_steps` steps, then 0."""
    if sgc is False:
        return 0.0
    horizon = sgc.anneal * max_steps
    return sgc.lambda0 * max(0.0, 1.0 - step / horizon)


class SGCSchedule(TrainerCallback):
    """Sets λ on every neuron before each optimizer step (state.global_step survives resume)."""

    def __init__(self, model: torch.nn.Module, sgc: SGCConfig | Literal[False]):
        self.model, self.sgc = model, sgc

    def on_step_begin(self, args, state, control, **kwargs):
        spiking.set_sgc_lambda(self.model, sgc_lambda(state.global_step, state.max_steps, self.sgc))


# ------------------------------------------------------------------------------ vocabulary terms in chunks


def head_logits_sums(
    fn: Callable[..., dict[str, torch.Tensor]],
    heads: Sequence[torch.nn.Module],
    hidden: Sequence[torch.Tensor],
    extras: Sequence[torch.Tensor] = (),
    chunk_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Σ over token chunks of `fn(*logits, *extras)`, each logits tensor [n, V] = `head(hidden)`.

    hidden: final hidden states [B, L, H], one per model, `hidden[i]` going through `heads[i]`
    (an LM head module; called, not its weight read, so ZeRO-3 gathers it); extras: per-token
    tensors [B, L, ...] (e.g. next-token targets). `fn` returns a dict of scalar SUMS over its
    tokens (the caller divides by the token count). A head whose hidden state needs no gradient
    (the frozen teacher) runs under no_grad.

    The [B·L, V] logits are what a KD loss at a 50 k vocabulary spends its memory on (several
    fp32 copies: both models' logits, log-softmaxes, the gradient). With `chunk_tokens` smaller
    than B·L, each chunk of tokens runs under non-reentrant activation checkpointing: its logits
    exist only while that chunk is computed, in the forward and again in the backward (which
    recomputes the chunk's head matmuls: one extra forward of each head per step, the price of
    the bounded memory). With `chunk_tokens` None or >= B·L the logits are computed in one call
    on [B, L, H], exactly as the model's own forward computes them (the same numbers).
    """
    batch, length = hidden[0].shape[:2]
    tokens = batch * length

    def run(*parts):
        hs, rest = parts[: len(heads)], parts[len(heads) :]
        logits = []
        for head, h in zip(heads, hs):
            with torch.set_grad_enabled(torch.is_grad_enabled() and h.requires_grad):
                logits.append(head(h.to(head.weight.dtype)).float().reshape(-1, head.out_features))
        return fn(*logits, *[r.reshape(-1, *r.shape[2:]) for r in rest])

    if chunk_tokens is None or chunk_tokens >= tokens:
        return run(*hidden, *extras)
    flat = [t.reshape(tokens, 1, *t.shape[2:]) for t in (*hidden, *extras)]  # [n, 1, ...]: "batch" of one-token rows
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, tokens, chunk_tokens):
        parts = [t[start : start + chunk_tokens] for t in flat]
        if torch.is_grad_enabled() and any(t.requires_grad for t in parts):
            sums = torch.utils.checkpoint.checkpoint(run, *parts, use_reentrant=False)
        else:
            sums = run(*parts)
        for key, value in sums.items():
            totals[key] = totals[key] + value if key in totals else value
    return totals


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, L] -> targets [B, L]: position i is scored on labels[i + 1]; the last on nothing (-100)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def block_outputs(hidden_states: tuple[torch.Tensor, ...], model) -> tuple[torch.Tensor, ...]:
    """Each block's output (the residual stream after block l), in order, from `hidden_states`.

    The project's Mamba (HF Mamba's convention) returns every block's output then the normed last
    one: all L blocks. A Transformer (HF Llama's convention) returns the embeddings, the outputs of
    blocks 0..L-2, then the normed last: its last block's own output is not there, so L-1 blocks.
    Pairs of teacher and student are compared with zip, which stops at the shorter: block l with
    block l either way."""
    if isinstance(getattr(model, "module", model), spiking.SpikingMambaForCausalLM):
        return tuple(hidden_states[:-1])
    return tuple(hidden_states[1:-1])


def final_hidden(model, batch: dict, **kwargs):
    """`model(**batch)` with every hidden state and the logits of the last position only: the
    caller computes the vocabulary terms through `head_logits_sums` (HF Mamba / Llama: the last
    entry of `hidden_states` is after the final norm, what the LM head reads)."""
    return model(**batch, output_hidden_states=True, logits_to_keep=1, **kwargs)


class TeacherStudentTrainer(Trainer):
    """HF Trainer against a frozen teacher (distill, sparsify): logs the loss terms averaged since the
    last log, the firing rate per placement of the last counted step, and the SGC λ.

    Subclasses write `compute_loss` and call `counting(model)` and `record(terms, names, stats)`.
    """

    # compute_loss returns a per-micro-batch mean: let training_step divide by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher: torch.nn.Module, sgc: SGCConfig | Literal[False], **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.sgc = teacher, sgc
        self._sums: dict[str, float] = {}
        self._count = 0
        self._rates: dict[str, float] = {}  # firing rate per placement, from the last counted step

    def counting(self, model) -> bool:
        """Count spikes on this step? Only on logging steps: the hot path pays nothing otherwise."""
        return model.training and (self.state.global_step + 1) % self.args.logging_steps == 0

    def record(self, model, terms: dict[str, torch.Tensor], names: Sequence[str], stats: spiking.SpikeStats | None) -> None:
        if not model.training:
            return
        for name in names:
            self._sums[name] = self._sums.get(name, 0.0) + float(terms[name])
        self._count += 1
        if stats is not None:
            self._rates = {f"firing_rate/{p}": d["firing_rate"] for p, d in stats.by_placement().items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._count and "loss" in logs:
            for name, total in self._sums.items():
                logs[name] = round(total / self._count, 6)
            logs.update(self._rates)
            logs["sgc_lambda"] = sgc_lambda(self.state.global_step, self.state.max_steps, self.sgc)
            self._sums, self._count = {}, 0
        super().log(logs, start_time)


# ------------------------------------------------------------------ rank 0 after a ZeRO-3 stage


def deepspeed_off() -> None:
    """Switch off the DeepSpeed config a Trainer registered with transformers (a module global).

    While it is live, `from_pretrained` shards every model it loads (`zero.Init`) and `generate`
    all-reduces after every token (`synced_gpus`). Two places need it gone: rank 0 evaluating alone
    at the end of a stage (the other ranks have finished, so it would wait for them forever), and
    the runner between stages (the next stage would get sharded models before it asks for them).
    transformers' public `unset_hf_deepspeed_config`; a no-op when no Trainer set one.
    """
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None:
        hf_deepspeed.unset_hf_deepspeed_config()


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 holds `model`'s weights as shards (rank 0 has only its slice)."""
    return hasattr(next(model.parameters()), "ds_id")


def gathered(model: torch.nn.Module, out_dir: Path, load: Callable[[Path], torch.nn.Module]) -> torch.nn.Module:
    """The model rank 0 evaluates: `model` itself, or under ZeRO-3 the whole model the stage has
    just saved (gathered) into `out_dir`, loaded with `load`. Call `deepspeed_off()` first."""
    if not is_zero3_partitioned(model):
        return model
    return load(out_dir)
