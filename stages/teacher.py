"""teacher stage: the Mamba teacher, pretrained from the hub or trained from scratch on the corpus.

    spikerl run recipes/tiny.yaml --only teacher

Where the teacher comes from is the recipe's top-level `model.teacher` (exactly one of):

* `pretrained: state-spaces/mamba-130m-hf` (hub id or local folder): loaded with
  `AutoModelForCausalLM.from_pretrained` and used as is; `finetune_pretrained: true` trains it
  further on the corpus with the knobs below.
* `train_from_scratch: {hidden_size: 128, num_hidden_layers: 4, ...}`: a small `MambaForCausalLM`
  (`build_model`) trained on the data stage's packed corpus with the HF `Trainer` (causal LM,
  labels = inputs).

Training is resumable and deterministic: checkpoints `checkpoint-N/` (model, optimizer, scheduler,
RNG, data position) go to `run_dir/teacher/checkpoints/`, a rerun resumes from the newest, and with
the same seed the resumed final weights equal an uninterrupted run's. The final model and the
tokenizer are saved with `save_pretrained` at the top of `run_dir/teacher/`; the metrics are the
held-out exact-match accuracy and perplexity (stages/tasks.py).

`build_training_args` and `load_compute_teacher` are shared with the distill stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import load_from_disk
from pydantic import Field, field_validator
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    MambaConfig,
    MambaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from spiking import SpikingMambaConfig, SpikingMambaForCausalLM, from_teacher, to_hf_mamba
from stages import tasks
from stages.context import StageContext, StrictModel, TeacherArch

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


class Config(TrainerKnobs):
    """`stages.teacher:` recipe section (the source is `model.teacher`)."""

    max_steps: int = Field(500, ge=1, description="optimizer steps: more = better teacher, longer run")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (small models take 1e-3..3e-3)")
    batch_size: int = Field(64, ge=1, description="packed blocks per device per step")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    finetune_pretrained: bool = Field(
        False, description="train a pretrained teacher on the corpus too (false: use it as loaded)"
    )
    eval_blocks: int = Field(64, ge=1, description="held-out corpus blocks for teacher_ppl")
    eval_max_new_tokens: int | None = Field(
        None, ge=1, description="generation budget per prompt (None: longest test answer + 2 tokens)"
    )


# -------------------------------------------------------------------------------------- models


def build_model(arch: TeacherArch, tokenizer, scan_backend: str = "auto") -> SpikingMambaForCausalLM:
    """A fresh Mamba with the vocabulary and special ids of `tokenizer`, for training from scratch.

    This is the one place the from-scratch teacher's model class is chosen. It is the project's
    `SpikingMambaForCausalLM` with no neurons: the same architecture, parameter names and numbers
    as HF `MambaForCausalLM` (tests/test_modeling.py checks logits to 1e-5), but its CPU scan
    trains ~4-70x faster than transformers' PyTorch path (benchmarks/student_vs_teacher.py).
    `save_teacher` stores the result as a genuine `MambaForCausalLM` when it has no MLP.
    """
    config = SpikingMambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        state_size=arch.state_size,
        expand=arch.expand,
        conv_kernel=arch.conv_kernel,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        neurons={},
        mlp_intermediate_size=arch.intermediate_size,  # a Mamba+MLP teacher (MAR's hybrid) when set
        scan_backend=scan_backend,
    )
    return SpikingMambaForCausalLM(config)


def save_teacher(out_dir: Path) -> None:
    """Rewrite the trained model in `out_dir` as an HF `MambaForCausalLM` when the block allows it.

    The Trainer saved the training class (gathering ZeRO-3 shards); reloading from disk keeps this
    independent of how the weights were distributed. A Mamba+MLP teacher has no HF class and stays
    a `SpikingMambaForCausalLM` without neurons.
    """
    trained = SpikingMambaForCausalLM.from_pretrained(out_dir)
    if trained.config.mlp_intermediate_size is None:
        to_hf_mamba(trained).save_pretrained(out_dir)


def load_pretrained(name: str, ctx: StageContext, dtype: torch.dtype | str = "auto"):
    """A pretrained causal LM from a hub id or a folder (HF Mamba / Mamba2, or any registered class)."""
    try:
        return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=ctx.model.trust_remote_code, dtype=dtype)
    except OSError as error:
        raise ValueError(f"model.teacher.pretrained: cannot load '{name}' ({error})") from error


def load_compute_teacher(teacher_dir: Path, ctx: StageContext, dtype: str = "float32"):
    """The teacher stage's output, frozen in eval mode, on the compute device, for distillation.

    Loaded into the project's mixer with no neurons (`from_teacher(..., neurons={})`): the same
    numbers as HF Mamba, a faster CPU scan, and `hidden_states` in the same convention as the student.
    """
    model = from_teacher(str(teacher_dir), neurons={}, scan_backend=ctx.model.scan_backend)
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


# ------------------------------------------------------------------------------------ training


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
        good = _last_complete_checkpoint(Path(args.output_dir))
        kept = f"the last good checkpoint {good} is kept and a re-run resumes from it" if good else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{self.stage}: step {step}: loss is {value} ({evidence}); stopped before the optimizer step; {kept}. "
            f"Lower stages.{self.stage}.lr (or the trl learning_rate), or clip gradients (trainer.max_grad_norm)"
        )


def _last_complete_checkpoint(folder: Path) -> Path | None:
    """Newest checkpoint-N/ with a readable trainer_state.json (HF Trainer writes it last)."""
    found = sorted(
        (int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
    )
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            continue
    return None


def warn_if_checkpoint_disagrees(checkpoint: Path, args: TrainingArguments, ctx: StageContext) -> None:
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


def train_causal_lm(model, tokenizer, corpus, cfg: Config, ctx: StageContext) -> dict[str, Any]:
    """Train `model` on corpus['train'] with the HF Trainer, resuming from the newest checkpoint."""
    args = build_training_args(cfg, ctx)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collate_blocks,
        train_dataset=corpus["train"],
        eval_dataset=corpus["test"].select(range(min(cfg.eval_blocks, len(corpus["test"])))),
        processing_class=tokenizer,
        # ctx.extra["callbacks"]: TrainerCallbacks the caller adds (profilers, tests that stop a run)
        callbacks=[JsonLogCallback(ctx.out_dir / "train_log.json"), *ctx.extra.get("callbacks", [])],
    )
    resume = ctx.last_checkpoint()
    if resume is not None:
        ctx.logger.info("%s: resuming from %s", ctx.stage, resume)
        warn_if_checkpoint_disagrees(resume, args, ctx)
    done = train_or_load(trainer, resume, ctx)
    trainer.save_model(str(ctx.out_dir))  # main process only; gathers ZeRO-3 shards
    return {"train_loss": done["train_loss"], "steps": done["steps"]}


def train_or_load(trainer, resume: Path | None, ctx: StageContext, load=None) -> dict[str, Any]:
    """Train (from `resume`, or from scratch), or load `resume` when it already holds every step.

    Returns {"train_loss", "steps", "log_history"}. `load(model, checkpoint)` puts a checkpoint's
    weights into the model (default: `load_checkpoint_weights`; rl passes its LoRA-aware loader).
    """
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


# ---------------------------------------------------------------------------------------- stage


def check_source(ctx: StageContext) -> None:
    source = ctx.model.teacher
    if (source.pretrained is None) == (source.train_from_scratch is None):
        raise ValueError(
            "model.teacher: set exactly one of `pretrained` (hub id or folder) or `train_from_scratch` "
            f"(an architecture); got {'both' if source.pretrained else 'neither'}"
        )


def preflight(cfg: Config, ctx: StageContext) -> None:
    """Checks the runner makes before the run folder is touched: one teacher source; a pretrained
    teacher's config loads (without remote code unless model.trust_remote_code) and has an
    embedding row for every token of the tokenizer the data stage uses."""
    check_source(ctx)
    name = ctx.model.teacher.pretrained
    if name is None:
        return
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=ctx.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"model.teacher.pretrained: cannot load '{name}' ({error})") from error
    saved = ctx.upstream.get("data", ctx.run_dir / "data") / "tokenizer"
    if saved.is_dir():  # the data stage already ran: its tokenizer is the one training will use
        field, tokenizer_name = f"the data stage's tokenizer {saved}", str(saved)
    else:  # the data stage will take model.tokenizer, else the teacher's own
        tokenizer_name = ctx.model.tokenizer or name
        field = f"model.tokenizer ({tokenizer_name})" if ctx.model.tokenizer else f"the tokenizer of {name}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=ctx.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"{field}: cannot load a tokenizer ({error})") from error
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < len(tokenizer):
        raise ValueError(
            f"{field} has {len(tokenizer)} tokens but model.teacher.pretrained ({name}) has vocab_size {vocab}: "
            "the tokenizer does not belong to this teacher"
        )


def run(cfg: Config, ctx: StageContext) -> dict:
    check_source(ctx)
    source = ctx.model.teacher
    data_dir = ctx.need("data")
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    corpus = load_from_disk(str(data_dir / "corpus"))
    prompts = load_from_disk(str(data_dir / "prompts")) if (data_dir / "prompts").is_dir() else None

    set_seed(ctx.seed)  # the initial weights of a from-scratch model come from this seed
    if source.pretrained is not None:
        loaded = load_pretrained(source.pretrained, ctx)
        check_vocab(loaded, tokenizer, f"model.teacher.pretrained ({source.pretrained})")
        train = cfg.finetune_pretrained
        if ctx.is_main_process and not train:
            loaded.save_pretrained(ctx.out_dir)  # used as loaded: the checkpoint is kept as it is
        # compute through the project's mixer (same numbers, faster scan); other classes as loaded
        model = from_teacher(loaded, neurons={}, scan_backend=ctx.model.scan_backend) if isinstance(loaded, MambaForCausalLM) else loaded
    else:
        model = build_model(source.train_from_scratch, tokenizer, ctx.model.scan_backend)
        train = True

    metrics: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if train:
        if len(corpus["train"]) == 0:
            raise ValueError(f"teacher: the corpus at {data_dir / 'corpus'} has no training blocks")
        metrics.update(train_causal_lm(model, tokenizer, corpus, cfg, ctx))
        if ctx.is_main_process and isinstance(model, SpikingMambaForCausalLM):
            with tasks.zero3_switched_off():  # rank 0 alone from here: reloads must not shard
                save_teacher(ctx.out_dir)
    if not ctx.is_main_process:
        return metrics

    tokenizer.save_pretrained(ctx.out_dir)
    with tasks.zero3_switched_off():
        model = tasks.gathered(model, ctx.out_dir, lambda folder: _reload(model, folder, ctx))
        return _evaluate(model, tokenizer, corpus, prompts, cfg, ctx, metrics)


def _reload(trained, folder: Path, ctx: StageContext):
    """The saved teacher, whole, in the class it trained as (the project's mixer for a Mamba)."""
    if isinstance(trained, SpikingMambaForCausalLM):
        return from_teacher(str(folder), neurons={}, scan_backend=ctx.model.scan_backend)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=ctx.model.trust_remote_code)


def _evaluate(model, tokenizer, corpus, prompts, cfg: Config, ctx: StageContext, metrics: dict[str, Any]) -> dict[str, Any]:
    """Held-out perplexity and task accuracy of the teacher (rank 0)."""
    if len(corpus["test"]) > 0:
        metrics["teacher_ppl"] = tasks.perplexity(model, corpus["test"], cfg.eval_batch_size, limit=cfg.eval_blocks)
    if prompts is not None and len(prompts["test"]) > 0:
        test = prompts["test"].select(range(min(cfg.eval_samples, len(prompts["test"]))))
        budget = cfg.eval_max_new_tokens or tasks.answer_token_budget(tokenizer, test["answer"])
        result = tasks.exact_match_accuracy(model, tokenizer, test, max_new_tokens=budget, batch_size=cfg.eval_batch_size)
        metrics.update(teacher_accuracy=result["accuracy"], eval_samples=result["n"])
        ctx.logger.info("teacher: examples (prompt, completion, answer): %s", result["examples"])
    return metrics
