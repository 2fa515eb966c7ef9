"""distill stage: single-stage knowledge distillation from the teacher into SpikingMamba.

    spikerl run recipes/tiny.yaml --only distill

Student = the teacher's architecture and weights with SI-LIF neurons at the configured placement
(methods.md §2); for a Transformer teacher, a Mamba whose mixers start from its attention weights
(`spiking.from_transformer`, methods.md §13; `keep_attention` keeps some layers as attention).
Thresholds are calibrated on a few batches before the first step. The teacher is
frozen. Training is the HF `Trainer` with a `compute_loss` override (methods.md §4):

    L = w_kl · τ² · KL(p_T ‖ p_S) + w_hid · mean_l MSE(h_T^l, h_S^l) + w_ce · CE(labels)

so checkpoints, resume, gradient accumulation, logging, accelerate and DeepSpeed come from the
library. SGC (methods.md §3) mixes the continuous input back in with λ annealed λ0 → 0 over the
first `anneal` fraction of steps by a `TrainerCallback`; the rest trains the pure spiking forward.

Output: `run_dir/distill/` holds the student (`save_pretrained`, loadable with
`AutoModelForCausalLM.from_pretrained` after `import spiking`, or with `trust_remote_code=True`
without spikerl: the folder carries its modeling code), the tokenizer and the runner's model card;
checkpoints go to `run_dir/distill/checkpoints/`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import load_from_disk
from pydantic import Field
from transformers import AutoConfig, AutoTokenizer, set_seed

import spiking
from stages import tasks
from stages.context import HubRepo, StageContext, StrictModel, push_to_hub_field
from stages.training import (
    SGCConfig,
    SGCSchedule,
    TeacherStudentTrainer,
    TrainerKnobs,
    block_outputs,
    build_training_args,
    check_vocab,
    collate_blocks,
    deepspeed_off,
    final_hidden,
    gathered,
    head_logits_sums,
    kd_training_blocks,
    load_compute_teacher,
    next_token_targets,
    stage_callbacks,
    task_share_field,
    train_or_load,
)


class LossConfig(StrictModel):
    """Weights of the distillation loss terms."""

    kl: float = Field(1.0, ge=0, description="forward KL(p_T‖p_S) on the logits, × temperature²")
    hidden: float = Field(1.0, ge=0, description="mean over blocks of MSE between residual streams")
    ce: float = Field(0.0, ge=0, description="cross-entropy on the corpus labels")
    temperature: float = Field(1.0, gt=0, description="softmax temperature τ of the KL term")
    chunk_tokens: int | None = Field(
        1024, ge=1, description="tokens per chunk of the KL / CE terms: bounds the [tokens, vocab] logits' memory "
        "(recomputed in backward); None = all tokens at once (one less head matmul, memory grows with batch·length)",
    )


class Config(TrainerKnobs):
    """`stages.distill:` recipe section."""

    neuron: spiking.NeuronSpec = Field(default_factory=spiking.NeuronSpec, description="neuron at each placement (kind, D | T, tau, learnable)")
    placement: list[str] = Field(
        default_factory=lambda: ["in_proj", "out_proj"],
        description="where neurons sit: in_proj, out_proj, x_proj, mlp.up, mlp.down (paper: in_proj, out_proj)",
    )
    sgc: SGCConfig | Literal[False] = Field(default_factory=SGCConfig, description="SGC schedule, or false to train pure spikes")
    keep_attention: list[int] = Field(
        default_factory=list, description="Transformer teacher only: layer ids whose attention the student keeps "
        "(a hybrid, KV cache in generation); every other layer becomes a Mamba mixer initialised from it",
    )
    attention_init: bool = Field(
        True, description="Transformer teacher only: start each converted mixer from the attention weights "
        "(V, K, Q, O; methods.md §13); false = Mamba's own random initialisation (the ablation)",
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="loss weights")
    calibration_batches: int = Field(4, ge=1, description="batches used to initialise thresholds before step 1")
    task_share: float = task_share_field()
    teacher_dtype: Literal["float32", "bfloat16"] = Field("float32", description="bf16 halves the teacher's memory on GPU")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (paper scale: 2e-5)")
    logging_steps: int = Field(20, ge=1, description="log losses, λ and firing rates every N steps")
    push_to_hub: HubRepo | None = push_to_hub_field()


# What the model card (README.md in the output folder, pipeline/model_card.py) shows of this
# stage's metrics: card field -> metric name; a field the stage does not measure is left out.
CARD_METRICS = {
    "accuracy": "student_accuracy", "samples": "eval_samples", "perplexity": "student_ppl",
    "firing_rate": "firing_rate", "energy_pj_per_token": "energy_pj_per_token_student", "energy_ratio": "energy_ratio",
    "teacher_accuracy": "teacher_accuracy",
}


def vocabulary_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, loss: LossConfig) -> dict[str, torch.Tensor]:
    """Sums over n tokens (methods.md §4): τ²·KL(p_T ‖ p_S) and the next-token CE (with w_ce > 0).

    student_logits, teacher_logits: [n, V]; targets: [n] (-100 = not scored). Returns
    {"kl": Σ_tokens τ²·KL, "ce": Σ_scored CE}: sums, so chunks of tokens add up.
    """
    tau = loss.temperature
    log_q = F.log_softmax(student_logits / tau, dim=-1)
    log_p = F.log_softmax(teacher_logits / tau, dim=-1)
    sums = {"kl": F.kl_div(log_q, log_p, log_target=True, reduction="sum") * tau**2}
    if loss.ce > 0:
        sums["ce"] = F.cross_entropy(student_logits, targets, ignore_index=-100, reduction="sum")
    return sums


def distillation_loss(
    student_final: torch.Tensor,
    teacher_final: torch.Tensor,
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    labels: torch.Tensor | None,
    loss: LossConfig,
    heads: tuple[torch.nn.Module, torch.nn.Module],
    chunk_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """The three terms and their weighted sum (methods.md §4).

    student_final / teacher_final: the final hidden states [B, L, H] (after the last norm), read
    by `heads` = (student LM head, teacher LM head); hidden: one [B, L, H] per block (the residual
    stream after the block); labels: [B, L] (next-token targets are labels shifted by one; -100
    ignored). The KL and CE terms run through `training.head_logits_sums`, `chunk_tokens` tokens
    at a time. Returns {"loss": weighted sum (differentiable), "kl", "hidden_mse", "ce": detached}.
    KL is averaged over tokens (batchmean over B·L), as in MambaInLlama.
    """
    tokens = student_final.shape[0] * student_final.shape[1]
    use_ce = labels is not None and loss.ce > 0
    targets = next_token_targets(labels) if use_ce else torch.full(student_final.shape[:2], -100, device=student_final.device)
    sums = head_logits_sums(
        lambda s, t, y: vocabulary_terms(s, t, y, loss if use_ce else loss.model_copy(update={"ce": 0.0})),
        heads, (student_final, teacher_final), (targets,), chunk_tokens,
    )
    kl = sums["kl"] / tokens
    zero = torch.zeros((), device=student_final.device)
    ce = sums["ce"] / (targets != -100).sum().clamp(min=1) if use_ce else zero
    if student_hidden:
        hidden = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student_hidden, teacher_hidden)]).mean()
    else:
        hidden = zero
    total = loss.kl * kl + loss.hidden * hidden + loss.ce * ce
    return {"loss": total, "kl": kl.detach(), "hidden_mse": hidden.detach(), "ce": ce.detach()}


class DistillTrainer(TeacherStudentTrainer):
    """HF Trainer whose loss is the distillation loss against a frozen teacher."""

    def __init__(self, *args, loss_cfg: LossConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_cfg = loss_cfg

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        want_hidden = self.loss_cfg.hidden > 0
        labels = inputs.get("labels")
        batch = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            t_out = final_hidden(self.teacher, batch)
        counting, stats = self.counting(model), None
        student = self.accelerator.unwrap_model(model)
        if counting:
            with spiking.count_spikes(student) as stats:
                s_out = final_hidden(model, batch)
        else:
            s_out = final_hidden(model, batch)
        # hidden_states: the last entry is after the final norm (what the LM head reads); the blocks'
        # outputs come from block_outputs (a Transformer teacher has one less, see there);
        # [:-1] = the residual stream after every block, [B, L, D] each; [-1] feeds the LM head
        terms = distillation_loss(
            s_out.hidden_states[-1],
            t_out.hidden_states[-1],
            block_outputs(s_out.hidden_states, model) if want_hidden else (),
            block_outputs(t_out.hidden_states, self.teacher) if want_hidden else (),
            labels,
            self.loss_cfg,
            heads=(student.get_output_embeddings(), self.teacher.get_output_embeddings()),
            chunk_tokens=self.loss_cfg.chunk_tokens,
        )
        self.record(model, terms, ("kl", "hidden_mse", "ce"), stats)
        return (terms["loss"], s_out) if return_outputs else terms["loss"]


def preflight(cfg: Config, ctx: StageContext) -> None:
    """Before the run folder is touched: `keep_attention` needs a Transformer teacher and its layer ids."""
    if not cfg.keep_attention:
        return
    source = ctx.model.teacher
    if source.train_from_scratch is not None:
        kind, layers = source.train_from_scratch.architecture, source.train_from_scratch.num_hidden_layers
    elif source.pretrained is not None:
        try:
            config = AutoConfig.from_pretrained(source.pretrained, trust_remote_code=ctx.model.trust_remote_code)
        except (OSError, ValueError):
            return  # the teacher stage's own preflight names the unloadable teacher
        kind = "mamba" if config.model_type in ("mamba", "mamba2", spiking.SpikingMambaConfig.model_type) else "llama"
        layers = config.num_hidden_layers
    else:
        return
    if kind == "mamba":
        raise ValueError("stages.distill.keep_attention: the teacher is a Mamba; only a Transformer teacher has attention to keep")
    bad = [i for i in cfg.keep_attention if not 0 <= i < layers]
    if bad:
        raise ValueError(f"stages.distill.keep_attention: {bad[0]} is not a layer id of the teacher (0..{layers - 1})")


def run(cfg: Config, ctx: StageContext) -> dict:
    data_dir, teacher_dir = ctx.need("data"), ctx.need("teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    corpus = load_from_disk(str(data_dir / "corpus"))
    prompts = load_from_disk(str(data_dir / "prompts"))

    # --- check every input before the first step: a bad one must not cost a training run
    if len(corpus["train"]) == 0 or len(corpus["train"][0]["input_ids"]) == 0:
        raise ValueError(f"stages.distill: the corpus at {data_dir / 'corpus'} has no tokens to distil on")
    train_blocks = kd_training_blocks(corpus, cfg.task_share, ctx.seed, "distill")
    teacher = load_compute_teacher(teacher_dir, ctx, dtype=cfg.teacher_dtype)
    check_vocab(teacher, tokenizer, f"stages.distill: teacher {teacher_dir}")
    neurons = {placement: cfg.neuron.to_config() for placement in cfg.placement}

    # --- student: teacher weights + neurons; thresholds calibrated on a fresh start only (a
    # checkpoint restores the trained ones, and re-calibrating would change the resumed run)
    resume = ctx.last_checkpoint()
    calibration = None
    if resume is None:
        n_blocks = min(cfg.calibration_batches * cfg.batch_size, len(corpus["train"]))
        ids = torch.tensor(corpus["train"][:n_blocks]["input_ids"])  # [n_blocks, L]
        calibration = [{"input_ids": chunk} for chunk in ids.split(cfg.batch_size)]
    # a converted Transformer's new mixer weights (gate, Δ) are drawn here: from the run's seed, not
    # from whatever the process drew before (a run that trained the teacher in this process, or not)
    set_seed(ctx.seed)
    try:
        student = spiking.from_teacher(
            teacher, neurons=neurons, calibration_batches=calibration, scan_backend=ctx.model.scan_backend,
            keep_attention=cfg.keep_attention,
            **({} if cfg.attention_init else {"attention_init": False}),
        )
    except ValueError as error:  # e.g. an unknown placement: name the recipe field
        field = "" if str(error).startswith("keep_attention") else "placement: "
        raise ValueError(f"stages.distill.{field}{error}") from error

    test_prompts = prompts["test"].select(range(min(cfg.eval_samples, len(prompts["test"]))))
    budget = tasks.answer_token_budget(tokenizer, test_prompts["answer"])
    converted_accuracy = None
    if resume is None and ctx.is_main_process:
        # the reference point: the same student right after conversion, before any distillation
        converted_accuracy = tasks.exact_match_accuracy(
            student, tokenizer, test_prompts, max_new_tokens=budget, batch_size=cfg.eval_batch_size
        )["accuracy"]
        ctx.logger.info("distill: converted student (no training) accuracy %.3f", converted_accuracy)
        ctx.record_before_training({"converted_accuracy": converted_accuracy})

    trainer = DistillTrainer(
        model=student,
        args=build_training_args(cfg, ctx),
        train_dataset=train_blocks,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        teacher=teacher,
        loss_cfg=cfg.loss,
        sgc=cfg.sgc,
        callbacks=stage_callbacks(ctx, SGCSchedule(student, cfg.sgc)),
    )
    done = train_or_load(trainer, resume, ctx)
    spiking.set_sgc_lambda(student, 0.0)  # the deployed model is pure spikes
    trainer.save_model(str(ctx.out_dir))  # main process only; gathers ZeRO-3 shards

    metrics: dict[str, Any] = {"train_loss": done["train_loss"], "steps": done["steps"]}
    if not ctx.is_main_process:
        return metrics
    tokenizer.save_pretrained(ctx.out_dir)
    # a resumed attempt reads the figure its first attempt recorded before training
    metrics["converted_accuracy"] = ctx.recorded_before_training().get("converted_accuracy")
    deepspeed_off()  # rank 0 alone from here: under ZeRO-3 evaluate the saved, whole student
    student = gathered(student, ctx.out_dir, spiking.load_deployed)
    blocks = corpus["test"].select(range(min(cfg.eval_blocks, len(corpus["test"]))))
    compared, _ = tasks.compare_with_teacher(student, teacher, tokenizer, blocks, test_prompts, budget, cfg.eval_batch_size)
    metrics.update(compared)
    return metrics
