"""sparsify stage: module-aware refinement of the distilled student (MAR, methods.md §5-6).

    spikerl run recipes/tiny.yaml --only sparsify
    spikerl run recipes/mar-hybrid.yaml          # Mamba+MLP teacher, spikes on the MLP too

Input: the distill stage's student (`ctx.need("distill")`). Per module type (`in_proj`,
`out_proj`, `x_proj`, `mlp.up`, `mlp.down`; `mixer.in_proj` etc. are accepted spellings) the
recipe picks `dense`, `si_lif {D}`, `atmn {T, tau}` or `keep` (the distilled neuron, the default
for a module type the recipe does not list), and whether the threshold is learnable. A neuron
whose kind or levels change (or that is new: the FFN of a Mamba+MLP student) is calibrated on a
few batches before the first step (fresh start only: a resumed run restores the trained
thresholds).

"Module-aware": before training the stage logs, per module type, its share of the dense
teacher's and of the distilled student's energy per token (spiking.energy on held-out blocks) and
its current firing rate, so the user sees where spiking saves most. The same figures go to the
manifest metrics (`energy_share_teacher/<module>`, `energy_share_distilled/<module>`,
`distilled_firing_rate/<module>`).

Training is the HF `Trainer` with a `compute_loss` override, the SBDS loss (methods.md §6):

    L = (1/T) Σ_t [α·KL(p_T‖q_t) + β·KL(q_t‖p_T)]·τ² + γ·mean_{t,l} MSE(F(h_T^l), F(h_{S,t}^l))

q_t = the student's distribution when every ATMN neuron runs only its first t+1 steps (SI-LIF
neurons are the same at every t; T = the largest ATMN T, 1 without ATMN); `spike_aware: false`
keeps the final step only. F = `pre_norm`: block l's output h^l, l = 0..L-1, i.e. the residual
stream entering the next block's RMSNorm (norm_f for the last block; the embedding entering
block 0 is left out, spikes cannot change it); `post_norm`: the outputs of those norms. A
block's inner MLP norm is not matched. ‖·‖² is taken as the mean over elements (as distill's
hidden MSE), so γ does not scale with the width. The teacher is the stage-1 teacher (default) or
any model folder (`teacher: path`), run through `spiking.from_teacher(..., neurons={})`: the
dense model in the project's own (fast) mixer, same numbers as HF Mamba.

Output: `run_dir/sparsify/` holds the refined student (`save_pretrained`, loadable with
`AutoModelForCausalLM.from_pretrained` after `import spiking`, or with `trust_remote_code=True`
without spikerl), the tokenizer and the runner's model card; checkpoints in
`run_dir/sparsify/checkpoints/`. Metrics: held-out accuracy and perplexity of teacher and student,
firing rate per module type, energy pJ/token of both and the ratio teacher/student, and the same
for the distilled student before refinement (`distilled_*`), on the same tokens.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from datasets import load_from_disk
from pydantic import Field, field_validator, model_validator
from transformers import AutoTokenizer

import spiking
from spiking.modeling import MLP_PLACEMENTS, PLACEMENTS
from spiking.regulariser import SpikeRateRegulariser
from stages import tasks
from stages.context import HubRepo, StageContext, StrictModel, local_path, push_to_hub_field
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

# Accepted spellings of a module type -> the placement name of spiking.modeling.PLACEMENTS
MODULE_ALIASES = {
    **{p: p for p in PLACEMENTS},
    "mixer.in_proj": "in_proj",
    "mixer.x_proj": "x_proj",
    "mixer.out_proj": "out_proj",
    "mixer.dt_proj": "dt_proj",
    "lm_head": "head",
    "mlp_up": "mlp.up",  # underscore forms: a dotted key cannot be written in a CLI override path
    "mlp_down": "mlp.down",
}

class ModuleNeuron(StrictModel):
    """What one module type gets: `dense`, `keep`, or a neuron (`{kind: si_lif, D}`, `{kind: atmn, T, tau}`).

    A bare string (`dense`, `keep`, `si_lif`, `atmn`) is the kind with default settings. A neuron's
    fields and defaults are `spiking.NeuronSpec`'s (unset = its default).
    """

    kind: Literal["dense", "si_lif", "atmn", "keep"] = Field(
        ..., description="dense: no neuron; keep: the distilled student's; si_lif / atmn: that neuron"
    )
    D: int | None = Field(None, ge=1, description="si_lif levels per sign (None: NeuronSpec's default): more = closer to dense, more spikes")
    T: int | None = Field(None, ge=1, description="atmn steps per token (None: NeuronSpec's default): more = finer output, more spikes")
    tau: float | None = Field(None, gt=0, description="atmn leak between steps (None: 1 = none; > 1 weakens later steps)")
    learnable: bool = Field(True, description="train the threshold (false: keep the calibrated one)")

    @model_validator(mode="before")
    @classmethod
    def _bare_kind(cls, value):
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fields_of_kind(self):
        if self.kind in ("si_lif", "atmn"):
            self.spec()  # NeuronSpec refuses a field of the other kind
            return self
        # a resolved recipe.yaml dumps every field at its default (D: null, learnable: true):
        # only a value other than the default is refused
        defaults = {name: field.default for name, field in type(self).model_fields.items()}
        extra = sorted(f for f in self.model_fields_set - {"kind"} if getattr(self, f) != defaults[f])
        if extra:
            raise ValueError(f"{extra[0]!r} does not apply to kind {self.kind!r} (allowed: none)")
        return self

    def spec(self) -> spiking.NeuronSpec | None:
        """The neuron for this module type; None for dense (and for keep: decided by the caller)."""
        if self.kind in ("dense", "keep"):
            return None
        return spiking.NeuronSpec.of({"kind": self.kind, "D": self.D, "T": self.T, "tau": self.tau, "learnable": self.learnable})


class SBDSConfig(StrictModel):
    """Spike-aware bidirectional distillation loss (methods.md §6)."""

    alpha: float = Field(0.2, ge=0, description="forward KL(p_T‖q_t): mass-covering, keeps every teacher mode")
    beta: float = Field(0.7, ge=0, description="reverse KL(q_t‖p_T): mode-seeking, the paper's heavier term")
    gamma: float = Field(1.0, ge=0, description="feature MSE between teacher and student residual streams")
    spike_aware: bool = Field(True, description="match the teacher after every ATMN step (T forwards) or only the last")
    features: Literal["pre_norm", "post_norm"] = Field(
        "pre_norm", description="residual stream before each RMSNorm (paper's best) or after it"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature τ of both KL terms (scaled by τ²)")
    ce: float = Field(
        0.0, ge=0, description="cross-entropy of the full-T output on the corpus labels (not in the paper; as distill's ce)"
    )
    chunk_tokens: int | None = Field(
        1024, ge=1, description="tokens per chunk of the KL / CE terms (every step's [tokens, vocab] logits): bounds their "
        "memory, recomputed in backward; None = all tokens at once",
    )
    energy: float = Field(
        0.0, ge=0, description="weight of the spike-energy term: w × (pJ per token of the spike-driven ACs / the teacher's "
        "pJ per token, 45nm-horowitz): fewer, cheaper spikes vs fidelity (not in MAR; methods.md §6)",
    )


def _default_modules() -> dict[str, ModuleNeuron]:
    # MAR's choice for a Mamba student: ATMN on both mixer projections; others keep the distilled neuron
    return {"in_proj": ModuleNeuron(kind="atmn"), "out_proj": ModuleNeuron(kind="atmn")}


class Config(TrainerKnobs):
    """`stages.sparsify:` recipe section."""

    modules: dict[str, ModuleNeuron] = Field(
        default_factory=_default_modules,
        description="module type -> neuron (in_proj, out_proj, x_proj, mlp.up, mlp.down); unlisted = keep",
    )
    sbds: SBDSConfig = Field(default_factory=SBDSConfig, description="loss weights and options")
    teacher: str | None = local_path(kind="folder", description="teacher model folder (None: the teacher stage's output)")
    sgc: SGCConfig | Literal[False] = Field(False, description="SGC schedule for the refined neurons, or false (MAR: pure spikes)")
    calibration_batches: int = Field(4, ge=1, description="batches used to calibrate new / changed neurons before step 1")
    task_share: float = task_share_field()
    threshold_init: Literal["calibrate", "inherit"] = Field(
        "calibrate",
        description="a changed neuron starts from a percentile calibration, or (inherit) from the distilled "
        "neuron's trained threshold at the same place, rescaled so the top level (D·V = T·V_th) is kept",
    )
    teacher_dtype: Literal["float32", "bfloat16"] = Field("float32", description="bf16 halves the teacher's memory on GPU")
    max_steps: int = Field(200, ge=1, description="optimizer steps (each costs T student forwards with spike_aware)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate: a refinement, lower than distill's")
    logging_steps: int = Field(20, ge=1, description="log losses and firing rates every N steps")
    eval_blocks: int = Field(16, ge=1, description="held-out corpus blocks for perplexity, firing rates and energy")
    eval_before: bool = Field(True, description="also score the distilled and the converted student before training")
    push_to_hub: HubRepo | None = push_to_hub_field()

    @field_validator("modules", mode="before")
    @classmethod
    def _module_names(cls, value):
        if not isinstance(value, dict):
            return value  # pydantic reports the type error
        normalised: dict[str, Any] = {}
        for key, choice in value.items():
            if key not in MODULE_ALIASES:
                raise ValueError(f"modules.{key}: unknown module type; expected one of {sorted(MODULE_ALIASES)}")
            name = MODULE_ALIASES[key]
            if name in normalised:
                raise ValueError(f"modules.{key}: module type {name!r} is given twice")
            normalised[name] = choice
        return normalised


# What the model card (README.md in the output folder, pipeline/model_card.py) shows of this
# stage's metrics: card field -> metric name; a field the stage does not measure is left out.
CARD_METRICS = {
    "accuracy": "student_accuracy", "samples": "eval_samples", "perplexity": "student_ppl",
    "firing_rate": "firing_rate", "energy_pj_per_token": "energy_pj_per_token_student", "energy_ratio": "energy_ratio",
    "teacher_accuracy": "teacher_accuracy",
}


# ------------------------------------------------------------------------------ the student


def _signature(spec: dict | None) -> tuple | None:
    """What makes a calibrated threshold invalid when it changes (None: no neuron)."""
    return None if spec is None else spiking.NeuronSpec.of(spec).signature()


def refined_neurons(distilled_neurons: dict, modules: dict[str, ModuleNeuron], has_mlp: bool) -> tuple[dict, list[str]]:
    """(placement -> config spec of the refined student, placements whose neuron is new or changed).

    Raises ValueError naming `stages.sparsify.modules.<type>` for an MLP module on a student
    without an MLP.
    """
    neurons = {p: dict(spec) for p, spec in distilled_neurons.items()}
    for placement, choice in modules.items():
        if placement in MLP_PLACEMENTS and not has_mlp and choice.kind not in ("dense", "keep"):
            raise ValueError(
                f"stages.sparsify.modules.{placement}: the student has no MLP (its teacher had no "
                "model.teacher.train_from_scratch.intermediate_size); use it on a Mamba+MLP student"
            )
        if choice.kind == "keep":
            continue
        if choice.kind == "dense":
            neurons.pop(placement, None)
        else:
            neurons[placement] = choice.spec().to_config()
    changed = [p for p in neurons if _signature(neurons[p]) != _signature(distilled_neurons.get(p))]
    return neurons, changed


@contextmanager
def first_steps(model: torch.nn.Module, steps: int | None) -> Iterator[None]:
    """Every ATMN neuron of `model` runs only its first `steps` steps inside the block (None = all)."""
    atmns = [n for _, n in spiking.iter_neurons(model) if isinstance(n, spiking.ATMN)]
    saved = [n.active_steps for n in atmns]
    for neuron in atmns:
        neuron.active_steps = steps
    try:
        yield
    finally:
        for neuron, value in zip(atmns, saved):
            neuron.active_steps = value


def spike_steps(model: torch.nn.Module) -> int:
    """T of SBDS: the largest ATMN step count in the model (1 with no ATMN: one distribution)."""
    return max((n.T for _, n in spiking.iter_neurons(model) if isinstance(n, spiking.ATMN)), default=1)


# ------------------------------------------------------------------------------ the loss


def forward_with_features(model, batch: dict, features: str | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The final hidden state [B, L, H] (what the LM head reads) and one feature [B, L, H] per block
    (none when `features` is None). The vocabulary terms are computed from the final state by
    `sbds_loss`, so no full [B, L, V] logits are made here.

    pre_norm: each block's output (`block_outputs`) = the residual stream entering the
    next block's RMSNorm, or norm_f for the last. post_norm: the outputs of those norms, taken
    with forward hooks (so they run inside the model's forward, where ZeRO-3 gathers weights).
    """
    if features != "post_norm":
        out = final_hidden(model, batch)
        return out.hidden_states[-1], (list(block_outputs(out.hidden_states, model)) if features == "pre_norm" else [])
    inner = getattr(model, "module", model)  # DDP wraps the model in .module
    if isinstance(inner, spiking.SpikingMambaForCausalLM):
        norms = [block.norm for block in inner.backbone.layers[1:]] + [inner.backbone.norm_f]
    else:  # a Llama-layout Transformer teacher
        norms = [layer.input_layernorm for layer in inner.model.layers[1:]] + [inner.model.norm]
    captured: list[torch.Tensor] = []
    handles = [norm.register_forward_hook(lambda _m, _a, output: captured.append(output)) for norm in norms]
    try:
        out = final_hidden(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return out.hidden_states[-1], captured[: len(norms)]  # a gradient-checkpointing recompute may append more later


def student_step_outputs(
    model, batch: dict, sbds: SBDSConfig, features: str | None, steps: int, count_in: torch.nn.Module | None = None,
    last_step=nullcontext,
) -> tuple[list[tuple[torch.Tensor, list[torch.Tensor]]], spiking.SpikeStats | None]:
    """([(final hidden_t, features_t)] for t = 0..steps-1, or the last step only; spike stats or None).

    Entry t runs every ATMN with its first t+1 steps; the last is the plain forward. With
    `count_in` (the unwrapped model) the spikes of that last, plain forward are counted; the last
    forward also runs inside `last_step()` (the spike-energy term records it).
    """
    ts = range(steps) if sbds.spike_aware else [steps - 1]
    outputs, stats = [], None
    for t in ts:
        last = t == steps - 1
        with first_steps(model, None if last else t + 1):
            if not last:
                outputs.append(forward_with_features(model, batch, features))
                continue
            with last_step(), (spiking.count_spikes(count_in) if count_in is not None else nullcontext()) as counted:
                outputs.append(forward_with_features(model, batch, features))
            stats = counted if count_in is not None else None
    return outputs, stats


def sbds_vocabulary_terms(teacher_logits: torch.Tensor, *rest: torch.Tensor, sbds: SBDSConfig) -> dict[str, torch.Tensor]:
    """Sums over n tokens of SBDS's KL terms per step t and the last step's CE (methods.md §6).

    teacher_logits [n, V] (p_T); rest = one student logits [n, V] per step (q_t), then the
    next-token targets [n] (-100 = not scored). Returns {"forward/t": Σ KL(p_T ‖ q_t),
    "reverse/t": Σ KL(q_t ‖ p_T), "ce": Σ CE of the last step (with sbds.ce > 0)}.
    """
    *step_logits, targets = rest
    tau = sbds.temperature
    log_p = F.log_softmax(teacher_logits / tau, dim=-1)
    sums = {}
    for t, logits in enumerate(step_logits):
        log_q = F.log_softmax(logits / tau, dim=-1)
        sums[f"forward/{t}"] = F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # KL(p_T ‖ q_t)
        sums[f"reverse/{t}"] = F.kl_div(log_p, log_q, log_target=True, reduction="sum")  # KL(q_t ‖ p_T)
    if sbds.ce > 0:
        sums["ce"] = F.cross_entropy(step_logits[-1], targets, ignore_index=-100, reduction="sum")
    return sums


def sbds_loss(
    step_final: Sequence[torch.Tensor],
    teacher_final: torch.Tensor,
    step_features: Sequence[Sequence[torch.Tensor]],
    teacher_features: Sequence[torch.Tensor],
    sbds: SBDSConfig,
    labels: torch.Tensor | None,
    heads: tuple[torch.nn.Module, torch.nn.Module],
) -> dict[str, torch.Tensor]:
    """The SBDS loss and its terms (methods.md §6).

    step_final: the student's final hidden state [B, L, H] per step t (its LM head gives q_t);
    teacher_final [B, L, H] (the teacher's head gives p_T); heads = (student head, teacher head);
    step_features: per step, one [B, L, H] per block; teacher_features: one [B, L, H] per block.
    The vocabulary terms run through `training.head_logits_sums`, `sbds.chunk_tokens` tokens at a
    time (teacher logits once per chunk for every step). KLs are averaged over tokens (batchmean
    over B·L) and over steps; the feature term is the mean over steps and blocks of the
    per-element MSE. labels [B, L] (optional): with `sbds.ce` > 0, the cross-entropy of the last
    step's logits on the next tokens (labels shifted by one, -100 ignored) is added with weight `ce`.
    Returns {"loss" (differentiable), "kl_forward", "kl_reverse", "feature_mse", "kl_forward_last", "ce"}.
    """
    tau = sbds.temperature
    tokens = teacher_final.shape[0] * teacher_final.shape[1]
    use_ce = sbds.ce > 0 and labels is not None
    targets = next_token_targets(labels) if use_ce else torch.full(teacher_final.shape[:2], -100, device=teacher_final.device)
    terms_cfg = sbds if use_ce else sbds.model_copy(update={"ce": 0.0})
    student_head, teacher_head = heads
    sums = head_logits_sums(
        lambda *logits: sbds_vocabulary_terms(*logits, sbds=terms_cfg),
        (teacher_head, *[student_head] * len(step_final)), (teacher_final, *step_final), (targets,), sbds.chunk_tokens,
    )
    forward = [sums[f"forward/{t}"] / tokens for t in range(len(step_final))]
    reverse = [sums[f"reverse/{t}"] / tokens for t in range(len(step_final))]
    kl_forward = torch.stack(forward).mean() * tau**2
    kl_reverse = torch.stack(reverse).mean() * tau**2
    mses = [F.mse_loss(s.float(), t.float()) for feats in step_features for s, t in zip(feats, teacher_features)]
    feature = torch.stack(mses).mean() if mses else torch.zeros((), device=teacher_final.device)
    total = sbds.alpha * kl_forward + sbds.beta * kl_reverse + sbds.gamma * feature
    ce = torch.zeros((), device=teacher_final.device)
    if use_ce:
        ce = sums["ce"] / (targets != -100).sum().clamp(min=1)
        total = total + sbds.ce * ce
    return {
        "loss": total,
        "kl_forward": kl_forward.detach(),
        "kl_reverse": kl_reverse.detach(),
        "feature_mse": feature.detach(),
        "kl_forward_last": (forward[-1] * tau**2).detach(),
        "ce": ce.detach(),
    }


class SparsifyTrainer(TeacherStudentTrainer):
    """HF Trainer whose loss is SBDS against a frozen teacher."""

    def __init__(self, *args, sbds: SBDSConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.sbds = sbds
        self.features = self.sbds.features if self.sbds.gamma > 0 else None
        self.spike_energy = None
        if sbds.energy > 0:  # w × (spike-driven pJ per token / the teacher's pJ per token), 45nm-horowitz
            student = self.model
            self.spike_energy = SpikeRateRegulariser(student, weight=sbds.energy)
            self.pj_per_spike = spiking.spike_costs(student)
            # dense: no forward; a Transformer teacher is costed at the training blocks' mean context
            block = torch.ones(1, len(self.train_dataset[0]["input_ids"]), dtype=torch.long)
            self.teacher_pj = spiking.estimate_energy(self.teacher, block).pj_per_token

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            t_final, t_features = forward_with_features(self.teacher, batch, self.features)
        student = self.accelerator.unwrap_model(model)
        steps = spike_steps(student)
        # spikes of the plain (last-step) forward, on logging steps only
        recording = self.spike_energy.recording if self.spike_energy is not None and model.training else nullcontext
        outputs, stats = student_step_outputs(
            model, batch, self.sbds, self.features, steps, student if self.counting(model) else None, recording
        )
        terms = sbds_loss(
            [o[0] for o in outputs], t_final, [o[1] for o in outputs], t_features, self.sbds, inputs.get("labels"),
            heads=(student.get_output_embeddings(), self.teacher.get_output_embeddings()),
        )
        names = ["kl_forward", "kl_reverse", "feature_mse", "kl_forward_last", "ce"]
        if recording is not nullcontext:
            tokens = torch.ones(outputs[-1][0].shape[:2], device=outputs[-1][0].device)
            fraction = self.spike_energy.energy(tokens, self.pj_per_spike) / self.teacher_pj
            terms["loss"] = terms["loss"] + self.sbds.energy * fraction
            terms["spike_energy_fraction"] = fraction.detach()
            names.append("spike_energy_fraction")
        self.record(model, terms, names, stats)
        return (terms["loss"], {"hidden_states": outputs[-1][0]}) if return_outputs else terms["loss"]


# ------------------------------------------------------------------------------ module report


def _rates(model, input_ids: torch.Tensor) -> tuple[spiking.EnergyReport, dict[str, dict]]:
    """Energy report and per-placement spike figures of `model` on held-out blocks [B, L]."""
    report, stats = spiking.measure(model, input_ids)
    return report, (stats.by_placement() if stats is not None else {})


def module_report(teacher, distilled, input_ids: torch.Tensor, plan: dict, ctx: StageContext) -> dict[str, Any]:
    """Log and return, per module type, its energy share (teacher, distilled student) and firing rate."""
    report_t, _ = _rates(teacher, input_ids)
    report_d, rates = _rates(distilled, input_ids)
    shares_t, shares_d = spiking.energy_shares(report_t), spiking.energy_shares(report_d)
    ctx.logger.info(
        "sparsify: where the energy goes (%s; %s)", report_t.cost.describe(), spiking.energy.MEMORY_NOTE
    )
    ctx.logger.info("sparsify: %-9s %14s %16s %12s   %s", "module", "teacher share", "distilled share", "firing rate", "refined neuron")
    metrics: dict[str, Any] = {
        "distilled_energy_pj_per_token": report_d.pj_per_token,
        "distilled_energy_ratio": report_t.pj_per_token / report_d.pj_per_token,
    }
    for placement in shares_t:
        rate = rates.get(placement, {}).get("firing_rate")
        ctx.logger.info(
            "sparsify: %-9s %13.1f%% %15.1f%% %12s   %s", placement, 100 * shares_t[placement],
            100 * shares_d[placement], "dense" if rate is None else f"{rate:.4f}", plan.get(placement, "dense"),
        )
        metrics[f"energy_share_teacher/{placement}"] = shares_t[placement]
        metrics[f"energy_share_distilled/{placement}"] = shares_d[placement]
        if rate is not None:
            metrics[f"distilled_firing_rate/{placement}"] = rate
    return metrics


def _describe(spec: dict | None) -> str:
    return "dense" if spec is None else spiking.NeuronSpec.of(spec).describe()


# ------------------------------------------------------------------------------ stage


def _load_teacher(cfg: Config, ctx: StageContext):
    """The dense teacher (frozen, eval) in the project's mixer: same numbers as HF Mamba, faster."""
    if cfg.teacher is None:
        folder = ctx.need("teacher")
    else:
        folder = Path(cfg.teacher)
        if not (folder / "config.json").is_file():
            raise ValueError(f"stages.sparsify.teacher: {folder} is not a model folder (no config.json)")
    # from_teacher(..., neurons={}) inside: a spiking folder given as teacher runs dense
    return load_compute_teacher(folder, ctx, dtype=cfg.teacher_dtype), folder


def run(cfg: Config, ctx: StageContext) -> dict:
    data_dir, distill_dir = ctx.need("data"), ctx.need("distill")
    tokenizer = AutoTokenizer.from_pretrained(distill_dir)
    corpus = load_from_disk(str(data_dir / "corpus"))
    prompts = load_from_disk(str(data_dir / "prompts"))

    # --- check every input before the first step: a bad one must not cost a training run
    if len(corpus["train"]) == 0 or len(corpus["train"][0]["input_ids"]) == 0:
        raise ValueError(f"stages.sparsify: the corpus at {data_dir / 'corpus'} has no tokens to train on")
    train_blocks = kd_training_blocks(corpus, cfg.task_share, ctx.seed, "sparsify")
    distilled = spiking.SpikingMambaForCausalLM.from_pretrained(distill_dir)
    teacher, teacher_dir = _load_teacher(cfg, ctx)
    distilled.to(teacher.device)
    check_vocab(teacher, tokenizer, f"stages.sparsify: teacher {teacher_dir}")
    if teacher.config.vocab_size != distilled.config.vocab_size:
        raise ValueError(
            f"stages.sparsify.teacher: vocab_size {teacher.config.vocab_size} differs from the student's "
            f"{distilled.config.vocab_size}: the KL terms need the same vocabulary"
        )
    if cfg.sbds.gamma > 0:
        for key in ("hidden_size", "num_hidden_layers"):
            if getattr(teacher.config, key) != getattr(distilled.config, key):
                raise ValueError(
                    f"stages.sparsify.sbds.gamma: the feature term needs the same {key} in teacher "
                    f"({getattr(teacher.config, key)}) and student ({getattr(distilled.config, key)}); set gamma: 0"
                )
    neurons, changed = refined_neurons(
        distilled.config.neurons, cfg.modules, has_mlp=distilled.config.mlp_intermediate_size is not None
    )
    try:
        student = spiking.from_teacher(distilled, neurons=neurons, scan_backend=ctx.model.scan_backend)
    except ValueError as error:  # a bad neuron setting: name the recipe field
        raise ValueError(f"stages.sparsify.modules: {error}") from error
    ctx.logger.info(
        "sparsify: neurons %s; new or changed (calibrated on a fresh start): %s",
        {p: _describe(s) for p, s in neurons.items()}, changed or "none",
    )

    resume = ctx.last_checkpoint()
    if resume is not None:
        _check_checkpoint_neurons(resume, neurons)
    test_prompts = prompts["test"].select(range(min(cfg.eval_samples, len(prompts["test"]))))
    budget = tasks.answer_token_budget(tokenizer, test_prompts["answer"])
    blocks = corpus["test"].select(range(min(cfg.eval_blocks, len(corpus["test"]))))
    held_out = torch.tensor(blocks["input_ids"], device=teacher.device)  # [eval_blocks, L]

    if resume is None:
        if ctx.is_main_process:
            # module-aware: where the operations are and how much each module type fires now
            before = module_report(teacher, distilled, held_out, {p: _describe(s) for p, s in neurons.items()}, ctx)
            if cfg.eval_before:
                before["distilled_accuracy"] = _accuracy(distilled, tokenizer, test_prompts, budget, cfg)
            ctx.record_before_training(before)
        # new / changed neurons start from thresholds calibrated on the student's own activations
        # (fresh start only: a checkpoint restores the trained ones)
        distilled_neurons = dict(spiking.iter_neurons(distilled))
        for name, neuron in spiking.iter_neurons(student):
            if spiking.neuron_placement(name) in changed:
                neuron.calibrated.fill_(False)
                if cfg.threshold_init == "inherit" and name in distilled_neurons:
                    spiking.inherit_threshold(neuron, distilled_neurons[name])
        n_blocks = min(cfg.calibration_batches * cfg.batch_size, len(corpus["train"]))
        ids = torch.tensor(corpus["train"][:n_blocks]["input_ids"], device=teacher.device)  # [n_blocks, L]
        if changed:
            spiking.calibrate(student, [{"input_ids": c} for c in ids.split(cfg.batch_size)], skip_calibrated=True)
        if ctx.is_main_process and cfg.eval_before:
            converted = _accuracy(student, tokenizer, test_prompts, budget, cfg)
            ctx.logger.info("sparsify: refined student before training (calibrated only): accuracy %.3f", converted)
            ctx.record_before_training({"converted_accuracy": converted})
    del distilled

    args = build_training_args(cfg, ctx)
    trainer = SparsifyTrainer(
        model=student,
        args=args,
        train_dataset=train_blocks,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        teacher=teacher,
        sbds=cfg.sbds,
        sgc=cfg.sgc,
        callbacks=stage_callbacks(ctx, SGCSchedule(student, cfg.sgc)),
    )
    done = train_or_load(trainer, resume, ctx)
    if trainer.spike_energy is not None:
        trainer.spike_energy.close()  # the hooks go: evaluation and the saved model run without them
    spiking.set_sgc_lambda(student, 0.0)  # the deployed model is pure spikes
    trainer.save_model(str(ctx.out_dir))  # main process only; gathers ZeRO-3 shards

    metrics: dict[str, Any] = {"train_loss": done["train_loss"], "steps": done["steps"], "spike_steps": spike_steps(student)}
    if not ctx.is_main_process:
        return metrics
    tokenizer.save_pretrained(ctx.out_dir)
    metrics.update(ctx.recorded_before_training())  # measured before training by the first attempt
    deepspeed_off()  # rank 0 alone from here: under ZeRO-3 evaluate the saved, whole student
    student = gathered(student, ctx.out_dir, spiking.load_deployed)
    compared, report_s = tasks.compare_with_teacher(student, teacher, tokenizer, blocks, test_prompts, budget, cfg.eval_batch_size)
    metrics.update(compared)
    metrics.update({f"energy_share_student/{p}": share for p, share in spiking.energy_shares(report_s).items()})
    return metrics


def _check_checkpoint_neurons(checkpoint: Path, neurons: dict) -> None:
    """A checkpoint with other neurons than the recipe asks for cannot be resumed (other weights)."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        return
    saved = json.loads(config_file.read_text()).get("neurons", {})
    if saved != neurons:
        raise ValueError(
            f"stages.sparsify.modules: the checkpoint {checkpoint} has neurons {saved}, the recipe now "
            f"gives {neurons}; restore the recipe or delete {Path(checkpoint).parent} to start over"
        )


def _accuracy(model, tokenizer, test_prompts, budget: int, cfg: Config) -> float:
    return tasks.exact_match_accuracy(
        model, tokenizer, test_prompts, max_new_tokens=budget, batch_size=cfg.eval_batch_size
    )["accuracy"]
