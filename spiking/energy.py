"""Energy per token of a (spiking) Mamba LM: operation counts times a cost table (methods.md §8).

Convention of the SNN literature: 45 nm CMOS, 32-bit float (Horowitz 2014),
``45nm-horowitz: MAC 4.6 pJ, AC 0.9 pJ, Mul 3.7 pJ``. **Memory access is not counted.**

Counted per token, per block (sizes read from the model's own modules, so HF
``MambaForCausalLM`` and ``SpikingMambaForCausalLM`` are counted by the same code):

=================  ==========================================================================
op                 count (d = hidden, E = d_inner, N = d_state, R = dt_rank, K = d_conv)
=================  ==========================================================================
norm               RMSNorm: d MAC (sum of squares) + 2·d Mul (normalise, weight)
in_proj            dense d·2E MAC, or spiking Σ|s|·2E AC; bias: 2E AC
conv1d             E·K MAC (depthwise); bias: E AC
conv_silu          SiLU = sigmoid + product: 2·E Mul
x_proj             E·(R+2N) MAC, or Σ|s|·(R+2N) AC
dt_proj            R·E MAC + E AC (bias)
dt_softplus        E Mul (a transcendental function counts as one Mul: a lower bound)
discretize_A       Ā = exp(Δ·A): 2·E·N Mul
discretize_B_x     B̄·x = (Δ·x)·B: E + E·N Mul
scan_state         h = Ā·h + B̄x: E·N MAC
scan_output        y = C·h: E·N MAC
D_skip             y + D·x: E MAC
gate               y·SiLU(z): 3·E Mul
out_proj           dense E·d MAC, or Σ|s|·d AC; bias: d AC
residual           d AC
mlp.*              (when the block has an MLP) norm, gate_proj/up_proj (d·F each), SiLU·up
                   (3·F Mul), down_proj (F·d), residual
<placement>.neuron per neuron input element: 1 Mul (x/V) + one AC per micro-step (SI-LIF D,
                   ATMN T): the membrane update. The output scale y = s·V folds into the next
                   layer's weights and costs nothing.
head               final RMSNorm + LM head d·vocab MAC. The embedding lookup is memory only.
=================  ==========================================================================

A linear layer fed by a spiking neuron costs ``Σ_i |s_i| · n_out`` ACs (ATMN: summed over the T
steps), with Σ|s| the real spike count per token measured by running the model on the given
tokens inside ``count_spikes`` (padding excluded when an attention mask is given). Zero spikes
cost nothing. Everything else stays dense and is counted, never dropped.

Usage: ``estimate_energy(model, input_ids, attention_mask).summary()``;
``energy_ratio(teacher, student, input_ids)`` = E_teacher / E_student per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from spiking.neurons import SpikeStats, count_spikes, iter_neurons, neuron_placement

__all__ = [
    "MODULE_OPS",
    "CostTable",
    "COST_TABLES",
    "HOROWITZ_45NM",
    "OpCount",
    "LayerEnergy",
    "EnergyReport",
    "dense_linear_ops",
    "spiking_linear_ops",
    "rms_norm_ops",
    "neuron_ops",
    "estimate_energy",
    "energy_report",
    "energy_ratio",
    "energy_shares",
    "measure",
]

MEMORY_NOTE = "memory access is not counted (compute only: MAC, AC and Mul operations)"

# Neuron placement (module type) -> the ops of `_block_ops` its neuron feeds, plus the neuron itself:
# what a spiking input at that placement turns from MACs into ACs.
MODULE_OPS: dict[str, tuple[str, ...]] = {
    "in_proj": ("in_proj", "in_proj.neuron"),
    "x_proj": ("x_proj", "x_proj.neuron"),
    "out_proj": ("out_proj", "out_proj.neuron"),
    "mlp.up": ("mlp.gate_proj", "mlp.up_proj", "mlp.up.neuron"),
    "mlp.down": ("mlp.down_proj", "mlp.down.neuron"),
}


@dataclass(frozen=True)
class CostTable:
    """Energy per operation in picojoules, under a name that every report carries."""

    name: str
    mac_pj: float
    ac_pj: float
    mul_pj: float

    def describe(self) -> str:
        return f"{self.name}: MAC {self.mac_pj} pJ, AC {self.ac_pj} pJ, Mul {self.mul_pj} pJ"


HOROWITZ_45NM = CostTable("45nm-horowitz", mac_pj=4.6, ac_pj=0.9, mul_pj=3.7)
COST_TABLES: dict[str, CostTable] = {HOROWITZ_45NM.name: HOROWITZ_45NM}


@dataclass
class OpCount:
    """Operations per token (floats: spike-driven counts are averages over tokens)."""

    mac: float = 0.0
    ac: float = 0.0
    mul: float = 0.0

    def __add__(self, other: "OpCount") -> "OpCount":
        return OpCount(self.mac + other.mac, self.ac + other.ac, self.mul + other.mul)

    def energy_pj(self, cost: CostTable) -> float:
        return self.mac * cost.mac_pj + self.ac * cost.ac_pj + self.mul * cost.mul_pj


# --- layer math: small pure functions, one per op family ------------------------------------


def dense_linear_ops(n_in: int, n_out: int, bias: bool = False) -> OpCount:
    """Dense linear layer, one token: ``n_in·n_out`` MACs (+ ``n_out`` ACs for a bias)."""
    return OpCount(mac=float(n_in * n_out), ac=float(n_out if bias else 0))


def spiking_linear_ops(spike_abs_sum: float, n_out: int, bias: bool = False) -> OpCount:
    """Linear layer fed by spikes, one token: ``Σ|s|·n_out`` ACs (+ ``n_out`` ACs for a bias).

    ``spike_abs_sum`` = Σ_i |s_i| over the layer's inputs for this token (ATMN: also over steps):
    each spike adds (or subtracts) one weight column, no multiply.
    """
    return OpCount(ac=float(spike_abs_sum) * n_out + float(n_out if bias else 0))


def rms_norm_ops(d: int) -> OpCount:
    """RMSNorm over d channels: d MACs (sum of squares) + 2·d Muls (normalise, weight)."""
    return OpCount(mac=float(d), mul=float(2 * d))


def neuron_ops(channels: int, steps: int) -> OpCount:
    """A neuron layer's own work per token: 1 Mul per element (x/V) + ``steps`` ACs (membrane)."""
    return OpCount(mul=float(channels), ac=float(channels * steps))


def _linear(layer: nn.Linear, spikes_per_token: float | None) -> OpCount:
    bias = layer.bias is not None
    if spikes_per_token is None:
        return dense_linear_ops(layer.in_features, layer.out_features, bias)
    return spiking_linear_ops(spikes_per_token, layer.out_features, bias)


# --- report -----------------------------------------------------------------------------------


@dataclass
class LayerEnergy:
    """One block (or the head): per-op counts per token and their energy."""

    name: str
    index: int | None
    ops: dict[str, OpCount]
    cost: CostTable
    spikes_per_token: dict[str, float] = field(default_factory=dict)  # placement -> Σ|s| per token
    firing_rate: float | None = None  # over this block's neurons; None when dense

    @property
    def total(self) -> OpCount:
        out = OpCount()
        for op in self.ops.values():
            out = out + op
        return out

    @property
    def pj_per_token(self) -> float:
        return self.total.energy_pj(self.cost)

    def to_dict(self) -> dict:
        t = self.total
        return {
            "name": self.name,
            "index": self.index,
            "mac": t.mac,
            "ac": t.ac,
            "mul": t.mul,
            "pj_per_token": self.pj_per_token,
            "firing_rate": self.firing_rate,
            "spikes_per_token": dict(self.spikes_per_token),
            "ops": {k: asdict(v) for k, v in self.ops.items()},
        }


@dataclass
class EnergyReport:
    """Energy per token of one model on given tokens, per layer and in total."""

    cost: CostTable
    layers: list[LayerEnergy]
    tokens: int
    spiking: bool
    firing_rate: float | None
    ops_counted: list[str]
    notes: list[str]

    @property
    def total(self) -> OpCount:
        out = OpCount()
        for layer in self.layers:
            out = out + layer.total
        return out

    @property
    def pj_per_token(self) -> float:
        return self.total.energy_pj(self.cost)

    def summary(self) -> str:
        t = self.total
        fr = "dense" if self.firing_rate is None else f"firing rate {self.firing_rate:.4f}"
        return (
            f"{self.pj_per_token / 1e6:.4f} µJ/token ({fr}; MAC {t.mac:.4g}, AC {t.ac:.4g}, "
            f"Mul {t.mul:.4g} per token) [{self.cost.describe()}; {MEMORY_NOTE}]"
        )

    def to_dict(self) -> dict:
        t = self.total
        return {
            "cost_table": asdict(self.cost),
            "cost_table_description": self.cost.describe(),
            "tokens": self.tokens,
            "spiking": self.spiking,
            "firing_rate": self.firing_rate,
            "total": {"mac": t.mac, "ac": t.ac, "mul": t.mul, "pj_per_token": self.pj_per_token},
            "layers": [layer.to_dict() for layer in self.layers],
            "ops_counted": list(self.ops_counted),
            "notes": list(self.notes),
        }


# --- model walk -------------------------------------------------------------------------------


def _block_ops(block: nn.Module, spikes: dict[str, float], neuron_steps: dict[str, tuple[int, int]]) -> dict:
    """Per-op counts for one Mamba block; ``spikes`` = placement -> Σ|s| per token for the
    placements that are spiking in this block (absent = dense)."""
    mixer = block.mixer
    d = mixer.in_proj.in_features
    E = mixer.in_proj.out_features // 2
    N = mixer.A_log.shape[-1]
    K = mixer.conv1d.kernel_size[0]
    ops: dict[str, OpCount] = {"norm": rms_norm_ops(d)}
    for placement, (channels, steps) in neuron_steps.items():
        if placement in spikes:
            ops[f"{placement}.neuron"] = neuron_ops(channels, steps)
    ops["in_proj"] = _linear(mixer.in_proj, spikes.get("in_proj"))
    ops["conv1d"] = OpCount(mac=float(E * K), ac=float(E if mixer.conv1d.bias is not None else 0))
    ops["conv_silu"] = OpCount(mul=float(2 * E))
    ops["x_proj"] = _linear(mixer.x_proj, spikes.get("x_proj"))
    ops["dt_proj"] = _linear(mixer.dt_proj, None)
    ops["dt_softplus"] = OpCount(mul=float(E))
    ops["discretize_A"] = OpCount(mul=float(2 * E * N))
    ops["discretize_B_x"] = OpCount(mul=float(E + E * N))
    ops["scan_state"] = OpCount(mac=float(E * N))
    ops["scan_output"] = OpCount(mac=float(E * N))
    ops["D_skip"] = OpCount(mac=float(E))
    ops["gate"] = OpCount(mul=float(3 * E))
    ops["out_proj"] = _linear(mixer.out_proj, spikes.get("out_proj"))
    ops["residual"] = OpCount(ac=float(d))

    mlp = getattr(block, "mlp", None)
    if mlp is not None:
        F = mlp.up_proj.out_features
        ops["mlp.norm"] = rms_norm_ops(d)
        ops["mlp.gate_proj"] = _linear(mlp.gate_proj, spikes.get("mlp.up"))
        ops["mlp.up_proj"] = _linear(mlp.up_proj, spikes.get("mlp.up"))
        ops["mlp.act"] = OpCount(mul=float(3 * F))  # SiLU(gate) (2 Mul) · up (1 Mul)
        ops["mlp.down_proj"] = _linear(mlp.down_proj, spikes.get("mlp.down"))
        ops["mlp.residual"] = OpCount(ac=float(d))
    return ops


def _count_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    return int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()


def _forward_inputs(batch) -> dict:
    """A batch (an input_ids tensor [B, L] or a dict with input_ids [, attention_mask]) as model kwargs."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    return {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}


def _is_spiking(model: nn.Module) -> bool:
    """The model has neurons and runs them (config.spiking not switched off)."""
    return any(True for _ in iter_neurons(model)) and bool(getattr(model.config, "spiking", True))


@torch.no_grad()
def measure(model: nn.Module, batches, cost: CostTable = HOROWITZ_45NM) -> tuple[EnergyReport, SpikeStats | None]:
    """Spike counts and energy per token of ``model`` on held-out tokens, as deployed (eval mode).

    ``batches``: one ``input_ids [B, L]`` tensor, or a list of such tensors or of dicts with
    ``input_ids`` and ``attention_mask`` (padding is then not counted). One forward per batch,
    without a cache, inside one ``count_spikes`` tally; a dense model needs no forward and gets
    ``None`` for the stats. Returns ``(EnergyReport, SpikeStats | None)``.
    """
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    inputs = [_forward_inputs(batch) for batch in batches]
    tokens = sum(_count_tokens(b["input_ids"], b.get("attention_mask")) for b in inputs)
    stats = None
    if _is_spiking(model):
        was_training = model.training
        model.eval()  # no dropout, no ATA threshold update
        try:
            with count_spikes(model) as stats:
                for batch in inputs:
                    stats.attention_mask = batch.get("attention_mask")
                    model(**batch, use_cache=False)
        finally:
            model.train(was_training)
    return energy_report(model, stats, tokens, cost), stats


def estimate_energy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cost: CostTable = HOROWITZ_45NM,
    stats: SpikeStats | None = None,
) -> EnergyReport:
    """Energy per token of ``model`` (HF MambaForCausalLM or SpikingMambaForCausalLM).

    input_ids / attention_mask ``[B, L]``: the tokens over which spikes are measured (a dense
    model needs no forward). ``stats``: spike counts already collected on these tokens (skips
    the forward). Spiking models are measured as deployed: SGC bypasses are not counted, so a
    neuron with ``sgc_lambda != 0`` is listed in the notes.
    """
    if stats is None and _is_spiking(model):
        return measure(model, [{"input_ids": input_ids, "attention_mask": attention_mask}], cost)[0]
    return energy_report(model, stats, _count_tokens(input_ids, attention_mask), cost)


def energy_report(model: nn.Module, stats: SpikeStats | None, tokens: int, cost: CostTable = HOROWITZ_45NM) -> EnergyReport:
    """The per-layer op counts of ``model``, its spiking layers costed from ``stats`` (the counts of
    a forward over ``tokens`` tokens; None for a dense model)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "layers"):
        raise ValueError(
            f"model {type(model).__name__} has no .backbone.layers: expected MambaForCausalLM or "
            "SpikingMambaForCausalLM"
        )
    notes = [MEMORY_NOTE, f"cost table {cost.describe()}"]
    neurons = list(iter_neurons(model))
    spiking = _is_spiking(model)
    if neurons and not spiking:
        notes.append("config.spiking is False: neurons are bypassed, every layer counted dense")
    lam_on = [name for name, n in neurons if n.sgc_lambda != 0]
    if lam_on and spiking:
        notes.append(
            f"{len(lam_on)} neurons have sgc_lambda != 0; counted as deployed (pure spiking, "
            "the SGC bypass is training-only and not counted)"
        )
    if spiking and stats is None:
        raise ValueError("energy_report: a spiking model needs the spike counts of a forward over the tokens (use measure)")

    records = stats.by_name() if spiking else {}
    layers: list[LayerEnergy] = []
    for index, block in enumerate(backbone.layers):
        spikes: dict[str, float] = {}
        neuron_steps: dict[str, tuple[int, int]] = {}
        fr_nonzero, fr_elements = 0, 0
        if spiking:
            prefix = _module_name(model, block)
            for rel_name, neuron in iter_neurons(block):
                placement = neuron_placement(rel_name)
                if placement not in MODULE_OPS:
                    raise ValueError(f"neuron {rel_name!r} in layer {index}: unknown placement {placement!r}")
                full = f"{prefix}.{rel_name}" if prefix else rel_name
                rec = records.get(full)
                if rec is None or rec["tokens"] == 0:
                    raise RuntimeError(
                        f"neuron {full!r} recorded no spikes during the forward: is it bypassed?"
                    )
                spikes[placement] = rec["abs_sum"] / rec["tokens"]
                neuron_steps[placement] = (neuron.channels, neuron.top_level)  # micro-steps: D or T
                fr_nonzero += rec["nonzero"]
                fr_elements += rec["elements"]
        layers.append(
            LayerEnergy(
                name=f"layers.{index}",
                index=index,
                ops=_block_ops(block, spikes, neuron_steps),
                cost=cost,
                spikes_per_token=spikes,
                firing_rate=(fr_nonzero / fr_elements) if fr_elements else None,
            )
        )

    d = model.lm_head.in_features
    head_ops = {"norm_f": rms_norm_ops(d), "lm_head": _linear(model.lm_head, None)}
    layers.append(LayerEnergy(name="head", index=None, ops=head_ops, cost=cost))

    ops_counted = sorted({op for layer in layers for op in layer.ops})
    notes.append(
        "transcendental functions (exp, softplus, sigmoid) count as one Mul each; "
        "the embedding lookup is memory only"
    )
    firing = stats.firing_rate if spiking else None
    return EnergyReport(cost, layers, tokens, spiking, firing, ops_counted, notes)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("block is not a submodule of the model")


def energy_ratio(
    teacher: nn.Module,
    student: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cost: CostTable = HOROWITZ_45NM,
) -> float:
    """Energy benefit ``E_teacher / E_student`` per token, both measured on the same tokens."""
    e_teacher = estimate_energy(teacher, input_ids, attention_mask, cost).pj_per_token
    e_student = estimate_energy(student, input_ids, attention_mask, cost).pj_per_token
    return e_teacher / e_student


def energy_shares(report: EnergyReport) -> dict[str, float]:
    """Module type (placement) -> fraction of the model's energy per token spent in the ops it feeds
    (MODULE_OPS), for every module type the model has."""
    total = report.pj_per_token
    shares = {}
    for placement, ops in MODULE_OPS.items():
        if any(ops[0] in layer.ops for layer in report.layers):
            pj = sum(layer.ops[op].energy_pj(report.cost) for layer in report.layers for op in ops if op in layer.ops)
            shares[placement] = pj / total
    return shares
