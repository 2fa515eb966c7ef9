"""teacher stage: the teacher (a Mamba or a Transformer), pretrained or trained from scratch on the corpus.

    spikerl run recipes/tiny.yaml --only teacher

Where the teacher comes from is the recipe's top-level `model.teacher` (exactly one of):

* `pretrained: state-spaces/mamba-130m-hf` (hub id or local folder): loaded with
  `AutoModelForCausalLM.from_pretrained` and used as is; `finetune_pretrained: true` trains it
  further on the corpus with the knobs below.
* `train_from_scratch: {hidden_size: 128, num_hidden_layers: 4, ...}`: a small `MambaForCausalLM`
  (`build_model`) trained on the data stage's packed corpus with the HF `Trainer` (causal LM,
  labels = inputs). With `architecture: llama` it is a small `LlamaForCausalLM` instead (a Transformer
  teacher: the distill stage converts its attention layers to Mamba mixers, methods.md §13).

Training is resumable and deterministic: checkpoints `checkpoint-N/` (model, optimizer, scheduler,
RNG, data position) go to `run_dir/teacher/checkpoints/`, a rerun resumes from the newest, and with
the same seed the resumed final weights equal an uninterrupted run's. The final model and the
tokenizer are saved with `save_pretrained` at the top of `run_dir/teacher/`; the metrics are the
held-out exact-match accuracy and perplexity (stages/tasks.py). The Trainer machinery is the
shared toolkit's (stages/training.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import load_from_disk
from pydantic import Field
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MambaForCausalLM,
    Trainer,
    set_seed,
)

from spiking import SpikingMambaConfig, SpikingMambaForCausalLM, from_teacher, to_hf_mamba
from stages import tasks
from stages.context import HubRepo, StageContext, TeacherArch, push_to_hub_field
from stages.training import (
    TrainerKnobs,
    build_training_args,
    check_vocab,
    collate_blocks,
    deepspeed_off,
    gathered,
    stage_callbacks,
    train_or_load,
)


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
    push_to_hub: HubRepo | None = push_to_hub_field()


# What the model card (README.md in the output folder, pipeline/model_card.py) shows of this
# stage's metrics: card field -> metric name; a field the stage does not measure is left out.
CARD_METRICS = {"accuracy": "teacher_accuracy", "samples": "eval_samples", "perplexity": "teacher_ppl"}


# -------------------------------------------------------------------------------------- models


def build_llama(arch: TeacherArch, tokenizer) -> LlamaForCausalLM:
    """A fresh `LlamaForCausalLM` (tied embeddings, like the Mamba teachers) with the vocabulary and
    special ids of `tokenizer`: transformers' own Transformer, trained by the same Trainer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def build_model(arch: TeacherArch, tokenizer, scan_backend: str = "auto") -> SpikingMambaForCausalLM | LlamaForCausalLM:
    """A fresh Mamba with the vocabulary and special ids of `tokenizer`, for training from scratch
    (a Llama for `architecture: llama`, `build_llama`).

    This is the one place the from-scratch teacher's model class is chosen. It is the project's
    `SpikingMambaForCausalLM` with no neurons: the same architecture, parameter names and numbers
    as HF `MambaForCausalLM` (tests/test_modeling.py checks logits to 1e-5), but its CPU scan
    trains ~4-70x faster than transformers' PyTorch path (benchmarks/student_vs_teacher.py).
    `save_teacher` stores the result as a genuine `MambaForCausalLM` when it has no MLP.
    """
    if arch.architecture == "llama":
        return build_llama(arch, tokenizer)
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


# ------------------------------------------------------------------------------------ training


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
        callbacks=stage_callbacks(ctx),
    )
    done = train_or_load(trainer, ctx.last_checkpoint(), ctx)
    trainer.save_model(str(ctx.out_dir))  # main process only; gathers ZeRO-3 shards
    return {"train_loss": done["train_loss"], "steps": done["steps"]}


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
    if not ctx.is_main_process:
        return metrics

    deepspeed_off()  # rank 0 alone from here: reloads must not shard, generate must not wait
    if train and isinstance(model, SpikingMambaForCausalLM):
        save_teacher(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)
    model = gathered(model, ctx.out_dir, lambda folder: _reload(model, folder, ctx))
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
