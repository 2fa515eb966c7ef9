"""Energy per token of a (spiking) Mamba LM, a Llama teacher or a hybrid with kept attention layers:
operation and memory counts times a named cost model.

Every figure names its cost model (methods.md §8, §10):

* ``45nm-horowitz`` (the SNN literature's convention, SpikingMamba's): 45 nm CMOS, 32-bit float,
  compute only: MAC 4.6 pJ, AC 0.9 pJ, Mul 3.7 pJ (Horowitz 2014). Memory access not counted.
* ``45nm-int8``: the same ops at Horowitz's 8-bit integer energies (add 0.03 pJ, mult 0.2 pJ:
  MAC 0.23, AC 0.03, Mul 0.2), compute only: the quantised dense baseline the SNN critics ask for.
* ``45nm-memory`` (``memory_model(batch)``): 45nm-horowitz's compute plus memory traffic:
  every weight, activation, membrane-state and spike-event byte read or written, on-chip SRAM at
  2.5 pJ/byte (Horowitz 2014: 20 pJ per 64-bit read of a 32 KB SRAM) and off-chip DRAM at
  162.5 pJ/byte (Horowitz 2014: 1.3–2.6 nJ per 64-bit DRAM access, the low end), fp32 weights
  and activations, 2-byte spike events. Weights come from DRAM once per batch of ``batch``
  tokens (``batch=1``: single-stream decode, every token reads every weight it needs).

Counted per token, per block (sizes read from the model's own modules, so HF
``MambaForCausalLM``, ``SpikingMambaForCausalLM`` and HF ``LlamaForCausalLM`` are counted by the
same code):

=================  ==========================================================================
op                 compute (d = hidden, E = d_inner, N = d_state, R = dt_rank, K = d_conv)
=================  ==========================================================================
norm               RMSNorm: d MAC (sum of squares) + 2·d Mul (normalise, weight)
in_proj            dense d·2E MAC, or spiking Σ|s|·2E AC; bias: 2E AC
bc_proj            (when the mixer has one: B, C from the block input) dense d·2N MAC, or spiking
                   Σ|s|·2N AC with in_proj's input spikes; x_proj then outputs R features only
conv1d             E·K MAC (depthwise); bias: E AC
conv_silu          SiLU = sigmoid + product: 2·E Mul
x_proj             E·n_out MAC, or Σ|s|·n_out AC; n_out = R+2N (R with bc_proj)
dt_proj            R·E MAC, or Σ|s|·E AC; + E AC (bias)
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
=================  ==========================================================================

An attention block (a Llama decoder layer, or a SpikingMambaBlock whose mixer is a kept
``LlamaAttention``: never spiking) replaces the mixer ops by the ones below (norm, residual and
mlp.* as above; a Llama layer's post_attention_layernorm is mlp.norm), with h = query heads,
kv = key/value heads, dh = head_dim and c = the keys a token's query attends to (its context):

=================  ==========================================================================
op                 compute
=================  ==========================================================================
q_proj             d·h·dh MAC (+ h·dh AC bias); k_proj, v_proj: d·kv·dh MAC each; o_proj h·dh·d
rope               rotate q and k: x·cos + rot(x)·sin = (h+kv)·dh·(2 Mul + 1 AC); the cos/sin
                   table is shared by every layer and read, not computed
attn_scores        QKᵀ: h·dh·c MAC; the 1/√dh scale is folded into q_proj's weights (exact,
                   RoPE is linear): not counted
attn_softmax       exp h·c Mul + sum h·c AC + normalise h·c Mul (the max subtraction not counted)
attn_values        AV: h·dh·c MAC
residual           d AC
=================  ==========================================================================

The attention ops grow linearly with c; a Mamba block's do not. ``context`` (energy_report,
measure) sets c; by default the mean number of keys per real token of the measured batches under
causal attention (the k-th real token of a row attends k keys). Memory (methods.md §12): the KV
cache is per-sequence state like the SSM state, counted on chip: c keys and c values read and the
new token's key and value written per token, 2·(c+1)·kv·dh values.

=================  ==========================================================================
op                 compute (neurons and the head, in every model)
=================  ==========================================================================
<placement>.neuron per neuron input element: 1 Mul (x/V) + one AC per micro-step (SI-LIF D,
                   ATMN T): the membrane update. The output scale y = s·V folds into the next
                   layer's weights and costs nothing.
head               final RMSNorm (+ the head neuron) + LM head d·vocab MAC, or Σ|s|·vocab AC;
                   the embedding lookup (memory only: one row from DRAM per token)
=================  ==========================================================================

A linear layer fed by a spiking neuron costs ``Σ_i |s_i| · n_out`` ACs (ATMN: summed over the T
steps), with Σ|s| the real spike count per token measured by running the model on the given
tokens inside ``count_spikes`` (padding excluded when an attention mask is given). Zero spikes
cost nothing. Everything else stays dense and is counted, never dropped. The memory side of each
op is in `_traffic` (methods.md §10).

Usage: ``measure(model, batches, cost)`` (runs the model, returns the report and the spike
counts); ``estimate_energy(model, input_ids, attention_mask).summary()``;
``energy_ratio(teacher, student, input_ids)`` = E_teacher / E_student per token;
``project(config, rates, cost)``: the same count at another shape from measured rates;
``energy_report(..., context=c)``: the same spike counts at another attention context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from spiking.neurons import SpikeStats, count_spikes, iter_neurons, neuron_placement

__all__ = [
    "MODULE_OPS",
    "CostTable",
    "MemoryCosts",
    "COST_TABLES",
    "HOROWITZ_45NM",
    "HOROWITZ_45NM_INT8",
    "memory_model",
    "OpCount",
    "LayerEnergy",
    "EnergyReport",
    "PlacementRates",
    "dense_linear_ops",
    "spiking_linear_ops",
    "rms_norm_ops",
    "neuron_ops",
    "attention_ops",
    "estimate_energy",
    "energy_report",
    "energy_ratio",
    "energy_shares",
    "measure",
    "placement_rates",
    "project",
    "break_even",
    "has_attention",
    "spike_costs",
]

MEMORY_NOTE = "memory access is not counted (compute only: MAC, AC and Mul operations)"

# Neuron placement (module type) -> the ops of `_block_ops` its neuron feeds, plus the neuron itself:
# what a spiking input at that placement turns from MACs into ACs.
MODULE_OPS: dict[str, tuple[str, ...]] = {
    "in_proj": ("in_proj", "bc_proj", "in_proj.neuron"),  # bc_proj (when present) reads the same input
    "x_proj": ("x_proj", "x_proj.neuron"),
    "dt_proj": ("dt_proj", "dt_proj.neuron"),
    "out_proj": ("out_proj", "out_proj.neuron"),
    "mlp.up": ("mlp.gate_proj", "mlp.up_proj", "mlp.up.neuron"),
    "mlp.down": ("mlp.down_proj", "mlp.down.neuron"),
    "head": ("lm_head", "head.neuron"),
}


@dataclass(frozen=True)
class MemoryCosts:
    """Energy per byte moved and the number formats, for a memory-inclusive cost model."""

    sram_pj_per_byte: float = 20.0 / 8  # Horowitz 2014: 32 KB SRAM, 20 pJ per 64-bit read
    dram_pj_per_byte: float = 1300.0 / 8  # Horowitz 2014: DRAM 1.3-2.6 nJ per 64-bit access (low end)
    weight_bytes: int = 4  # fp32 weights
    activation_bytes: int = 4  # fp32 activations, membrane potentials, SSM state
    event_bytes: int = 2  # a spike event: the input index (and its sign / count)
    batch: int = 1  # tokens that share one DRAM read of each weight

    def describe(self) -> str:
        return (
            f"+ memory: SRAM {self.sram_pj_per_byte} pJ/B, DRAM {self.dram_pj_per_byte} pJ/B (Horowitz 2014), "
            f"{self.weight_bytes}-byte weights, {self.activation_bytes}-byte activations, {self.event_bytes}-byte "
            f"spike events, weights from DRAM once per {self.batch} token{'s' if self.batch != 1 else ''}"
        )


@dataclass(frozen=True)
class CostTable:
    """Energy per operation in picojoules (and per byte moved, with `memory`), under a name that
    every report carries."""

    name: str
    mac_pj: float
    ac_pj: float
    mul_pj: float
    memory: MemoryCosts | None = None  # None: compute only

    def describe(self) -> str:
        text = f"{self.name}: MAC {self.mac_pj} pJ, AC {self.ac_pj} pJ, Mul {self.mul_pj} pJ"
        return text + (f" {self.memory.describe()}" if self.memory else "")


HOROWITZ_45NM = CostTable("45nm-horowitz", mac_pj=4.6, ac_pj=0.9, mul_pj=3.7)
# Horowitz 2014, 8-bit integer: add 0.03 pJ, mult 0.2 pJ (a MAC is both)
HOROWITZ_45NM_INT8 = CostTable("45nm-int8", mac_pj=0.23, ac_pj=0.03, mul_pj=0.2)


def memory_model(batch: int = 1) -> CostTable:
    """45nm-horowitz's compute plus memory traffic, weights read from DRAM once per `batch` tokens."""
    name = "45nm-memory" if batch == 1 else f"45nm-memory-b{batch}"
    return replace(HOROWITZ_45NM, name=name, memory=MemoryCosts(batch=batch))


COST_TABLES: dict[str, CostTable] = {t.name: t for t in (HOROWITZ_45NM, HOROWITZ_45NM_INT8, memory_model(1))}


@dataclass
class OpCount:
    """Operations and bytes moved per token (floats: spike-driven counts are averages over tokens)."""

    mac: float = 0.0
    ac: float = 0.0
    mul: float = 0.0
    sram_bytes: float = 0.0
    dram_bytes: float = 0.0

    def __add__(self, other: "OpCount") -> "OpCount":
        return OpCount(
            self.mac + other.mac, self.ac + other.ac, self.mul + other.mul,
            self.sram_bytes + other.sram_bytes, self.dram_bytes + other.dram_bytes,
        )

    def energy_pj(self, cost: CostTable) -> float:
        compute = self.mac * cost.mac_pj + self.ac * cost.ac_pj + self.mul * cost.mul_pj
        if cost.memory is None:
            return compute
        return compute + self.sram_bytes * cost.memory.sram_pj_per_byte + self.dram_bytes * cost.memory.dram_pj_per_byte


# --- layer math: small pure functions, one per op family ------------------------------------


@dataclass(frozen=True)
class PlacementRates:
    """Per channel and per token, what a spiking layer's input does: Σ|s| (spikes), events
    (nonzero spikes: one per SI-LIF count, one per ATMN step that fires) and the fraction of tokens
    in which the channel is active (any spike: its weight row is needed)."""

    spikes: float
    events: float
    active: float

    def scaled(self, k: float) -> "PlacementRates":
        return PlacementRates(self.spikes * k, self.events * k, min(1.0, self.active * k))


def _rows_needed(active: float, batch: int) -> float:
    """Fraction of a spiking layer's weight rows a batch of `batch` tokens needs (independent tokens)."""
    return 1.0 - (1.0 - min(max(active, 0.0), 1.0)) ** batch


def dense_linear_ops(n_in: int, n_out: int, bias: bool = False, memory: MemoryCosts | None = None) -> OpCount:
    """Dense linear layer, one token: ``n_in·n_out`` MACs (+ ``n_out`` ACs for a bias).

    Memory: every MAC reads its weight on chip, the input is read and the output written once,
    and the weights come from DRAM once per batch.
    """
    ops = OpCount(mac=float(n_in * n_out), ac=float(n_out if bias else 0))
    if memory is not None:
        weights = n_in * n_out + (n_out if bias else 0)
        ops.sram_bytes = weights * memory.weight_bytes + (n_in + n_out) * memory.activation_bytes
        ops.dram_bytes = weights * memory.weight_bytes / memory.batch
    return ops


def spiking_linear_ops(
    spike_abs_sum: float, n_out: int, bias: bool = False, memory: MemoryCosts | None = None,
    n_in: int = 0, events: float = 0.0, active: float = 0.0,
) -> OpCount:
    """Linear layer fed by spikes, one token: ``Σ|s|·n_out`` ACs (+ ``n_out`` ACs for a bias).

    ``spike_abs_sum`` = Σ_i |s_i| over the layer's inputs for this token (ATMN: also over steps):
    each spike adds (or subtracts) one weight column, no multiply. Memory: each AC reads its
    weight on chip, each spike event is read, the output is written; from DRAM, the rows of the
    inputs that spiked in the batch (`active`: fraction of tokens a channel spikes in; rows needed
    by a batch of b tokens = n_in·(1 − (1 − active)^b)), once per batch.
    """
    ops = OpCount(ac=float(spike_abs_sum) * n_out + float(n_out if bias else 0))
    if memory is not None:
        rows = n_in * _rows_needed(active, memory.batch)
        ops.sram_bytes = (spike_abs_sum * n_out + (n_out if bias else 0)) * memory.weight_bytes
        ops.sram_bytes += events * memory.event_bytes + n_out * memory.activation_bytes
        ops.dram_bytes = (rows * n_out + (n_out if bias else 0)) * memory.weight_bytes / memory.batch
    return ops


def rms_norm_ops(d: int, memory: MemoryCosts | None = None) -> OpCount:
    """RMSNorm over d channels: d MACs (sum of squares) + 2·d Muls (normalise, weight)."""
    return _traffic(OpCount(mac=float(d), mul=float(2 * d)), memory, weights=d, reads=d, writes=d)


def neuron_ops(channels: int, steps: int, memory: MemoryCosts | None = None) -> OpCount:
    """A neuron layer's own work per token: 1 Mul per element (x/V) + ``steps`` ACs (membrane).

    Memory: the input is read once, the membrane potential read and written at every micro-step,
    the threshold read (its spikes are counted as events by the layer they feed).
    """
    ops = OpCount(mul=float(channels), ac=float(channels * steps))
    return _traffic(ops, memory, weights=channels, reads=channels, state=2 * channels * steps)


def _traffic(ops: OpCount, memory: MemoryCosts | None, weights: int = 0, reads: int = 0, writes: int = 0,
             state: int = 0) -> OpCount:
    """`ops` with the bytes of a dense op: `weights` parameters (on chip, and from DRAM once per
    batch), `reads` / `writes` activations and `state` state values moved, all per token."""
    if memory is not None:
        ops.sram_bytes += weights * memory.weight_bytes + (reads + writes + state) * memory.activation_bytes
        ops.dram_bytes += weights * memory.weight_bytes / memory.batch
    return ops


def _linear(layer: nn.Linear, rates: PlacementRates | None, memory: MemoryCosts | None) -> OpCount:
    bias = layer.bias is not None
    if rates is None:
        return dense_linear_ops(layer.in_features, layer.out_features, bias, memory)
    n_in = layer.in_features
    return spiking_linear_ops(rates.spikes * n_in, layer.out_features, bias, memory, n_in, rates.events * n_in, rates.active)


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
            "sram_bytes": t.sram_bytes,
            "dram_bytes": t.dram_bytes,
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
    context: float | None = None  # keys attended per token by the attention layers; None: no attention

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
        memory = f", SRAM {t.sram_bytes:.4g} B, DRAM {t.dram_bytes:.4g} B" if self.cost.memory else ""
        note = "" if self.cost.memory else f"; {MEMORY_NOTE}"
        context = "" if self.context is None else f"; attention context {self.context:g} keys"
        return (
            f"{self.pj_per_token / 1e6:.4f} µJ/token ({fr}{context}; MAC {t.mac:.4g}, AC {t.ac:.4g}, "
            f"Mul {t.mul:.4g}{memory} per token) [{self.cost.describe()}{note}]"
        )

    def to_dict(self) -> dict:
        t = self.total
        return {
            "cost_table": asdict(self.cost),
            "cost_table_description": self.cost.describe(),
            "tokens": self.tokens,
            "spiking": self.spiking,
            "firing_rate": self.firing_rate,
            "context": self.context,
            "total": {"mac": t.mac, "ac": t.ac, "mul": t.mul, "sram_bytes": t.sram_bytes, "dram_bytes": t.dram_bytes,
                      "pj_per_token": self.pj_per_token},
            "layers": [layer.to_dict() for layer in self.layers],
            "ops_counted": list(self.ops_counted),
            "notes": list(self.notes),
        }


# --- model walk -------------------------------------------------------------------------------


def _backbone_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the backbone, its blocks): ``.backbone.layers`` (HF / Spiking Mamba) or ``.model.layers`` (HF Llama)."""
    for attr in ("backbone", "model"):
        backbone = getattr(model, attr, None)
        if isinstance(backbone, nn.Module) and hasattr(backbone, "layers"):
            return backbone, backbone.layers
    raise ValueError(
        f"model {type(model).__name__} has no .backbone.layers (nor .model.layers): expected MambaForCausalLM, "
        "SpikingMambaForCausalLM or LlamaForCausalLM"
    )


def _attention(block: nn.Module) -> nn.Module | None:
    """The block's attention module: a Llama decoder layer's ``self_attn``, or a kept-attention mixer
    (a ``LlamaAttention`` in a SpikingMambaBlock: it has q_proj, a Mamba mixer has not); else None."""
    attn = getattr(block, "self_attn", None)
    if attn is None:
        mixer = getattr(block, "mixer", None)
        attn = mixer if mixer is not None and hasattr(mixer, "q_proj") else None
    return attn


def has_attention(model: nn.Module) -> bool:
    """Whether any block of ``model`` is an attention layer (its energy per token then depends on the context)."""
    return any(_attention(block) is not None for block in _backbone_layers(model)[1])


def attention_ops(attn: nn.Module, context: float, memory: MemoryCosts | None) -> dict[str, OpCount]:
    """Per-op counts, one token, of an attention module (LlamaAttention: q/k/v/o_proj, RoPE, GQA)
    whose query attends ``context`` keys (the module docstring's table; memory: methods.md §12).

    Sizes from the module: dh = head_dim, h = q_proj outputs / dh, kv = k_proj outputs / dh. The KV
    cache is per-sequence state like the SSM state (on chip): c keys and c values read, the new
    token's key and value written.
    """
    dh = attn.head_dim
    h, kv = attn.q_proj.out_features // dh, attn.k_proj.out_features // dh
    c = float(context)
    ops = {name: _linear(getattr(attn, name), None, memory) for name in ("q_proj", "k_proj", "v_proj")}
    # x·cos + rotate_half(x)·sin per element of q and k; cos / sin: one row of the shared table
    ops["rope"] = _traffic(OpCount(mul=float(2 * (h + kv) * dh), ac=float((h + kv) * dh)), memory,
                           reads=(h + kv) * dh + 2 * dh, writes=(h + kv) * dh)
    # QKᵀ, 1/√dh folded into q_proj (exact: RoPE is linear); K cache: c keys read, the new one written
    ops["attn_scores"] = _traffic(OpCount(mac=h * dh * c), memory, reads=h * dh, writes=h * c, state=(c + 1) * kv * dh)
    # exp (one Mul, as every transcendental), the sum, the normalisation
    ops["attn_softmax"] = _traffic(OpCount(mul=2 * h * c, ac=h * c), memory, reads=h * c, writes=h * c)
    ops["attn_values"] = _traffic(OpCount(mac=h * dh * c), memory, reads=h * c, writes=h * dh, state=(c + 1) * kv * dh)
    ops["o_proj"] = _linear(attn.o_proj, None, memory)
    return ops


def _block_ops(block: nn.Module, rates: dict[str, PlacementRates], neuron_steps: dict[str, tuple[int, int]],
               memory: MemoryCosts | None, context: float | None = None) -> dict:
    """Per-op counts for one block (Mamba, or attention at ``context`` keys per token); ``rates`` =
    placement -> its spike rates for the placements that are spiking in this block (absent = dense)."""
    attn = _attention(block)
    if attn is not None:
        d = attn.q_proj.in_features
        ops = {"norm": rms_norm_ops(d, memory)}
        for placement, (channels, steps) in neuron_steps.items():  # the MLP's, if any: attention has none
            if placement in rates:
                ops[f"{placement}.neuron"] = neuron_ops(channels, steps, memory)
        ops.update(attention_ops(attn, context, memory))
        ops["residual"] = _traffic(OpCount(ac=float(d)), memory, reads=2 * d, writes=d)
        return _mlp_ops(block, d, rates, memory, ops)
    mixer = block.mixer
    d = mixer.in_proj.in_features
    E = mixer.in_proj.out_features // 2
    N = mixer.A_log.shape[-1]
    K = mixer.conv1d.kernel_size[0]
    conv_bias = mixer.conv1d.bias is not None
    ops: dict[str, OpCount] = {"norm": rms_norm_ops(d, memory)}
    for placement, (channels, steps) in neuron_steps.items():
        if placement in rates:
            ops[f"{placement}.neuron"] = neuron_ops(channels, steps, memory)
    ops["in_proj"] = _linear(mixer.in_proj, rates.get("in_proj"), memory)
    bc_proj = getattr(mixer, "bc_proj", None)
    if bc_proj is not None:  # B, C from the block input: fed by in_proj's input (and its neuron's spikes)
        ops["bc_proj"] = _linear(bc_proj, rates.get("in_proj"), memory)
    ops["conv1d"] = _traffic(OpCount(mac=float(E * K), ac=float(E if conv_bias else 0)), memory,
                             weights=E * K + (E if conv_bias else 0), reads=E, state=E * K)  # the K-window conv state
    ops["conv_silu"] = _traffic(OpCount(mul=float(2 * E)), memory, reads=E, writes=E)
    ops["x_proj"] = _linear(mixer.x_proj, rates.get("x_proj"), memory)
    ops["dt_proj"] = _linear(mixer.dt_proj, rates.get("dt_proj"), memory)
    ops["dt_softplus"] = _traffic(OpCount(mul=float(E)), memory, reads=E, writes=E)
    ops["discretize_A"] = _traffic(OpCount(mul=float(2 * E * N)), memory, weights=E * N, reads=E)  # A, Δ
    ops["discretize_B_x"] = _traffic(OpCount(mul=float(E + E * N)), memory, reads=N + E)  # B, x
    ops["scan_state"] = _traffic(OpCount(mac=float(E * N)), memory, state=2 * E * N)  # h read and written
    ops["scan_output"] = _traffic(OpCount(mac=float(E * N)), memory, reads=N, writes=E)  # C, y
    ops["D_skip"] = _traffic(OpCount(mac=float(E)), memory, weights=E, reads=E, writes=E)
    ops["gate"] = _traffic(OpCount(mul=float(3 * E)), memory, reads=2 * E, writes=E)
    ops["out_proj"] = _linear(mixer.out_proj, rates.get("out_proj"), memory)
    ops["residual"] = _traffic(OpCount(ac=float(d)), memory, reads=2 * d, writes=d)
    return _mlp_ops(block, d, rates, memory, ops)


def _mlp_ops(block: nn.Module, d: int, rates: dict[str, PlacementRates], memory: MemoryCosts | None, ops: dict) -> dict:
    """`ops` plus the block's gated MLP (SpikingMambaMLP or LlamaMLP: the same names), if it has one."""
    mlp = getattr(block, "mlp", None)
    if mlp is not None:
        F = mlp.up_proj.out_features
        ops["mlp.norm"] = rms_norm_ops(d, memory)
        ops["mlp.gate_proj"] = _linear(mlp.gate_proj, rates.get("mlp.up"), memory)
        ops["mlp.up_proj"] = _linear(mlp.up_proj, rates.get("mlp.up"), memory)
        ops["mlp.act"] = _traffic(OpCount(mul=float(3 * F)), memory, reads=2 * F, writes=F)  # SiLU(gate) (2 Mul) · up (1 Mul)
        ops["mlp.down_proj"] = _linear(mlp.down_proj, rates.get("mlp.down"), memory)
        ops["mlp.residual"] = _traffic(OpCount(ac=float(d)), memory, reads=2 * d, writes=d)
    return ops


def _count_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    return int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()


def _forward_inputs(batch) -> dict:
    """A batch (an input_ids tensor [B, L] or a dict with input_ids [, attention_mask]) as model kwargs."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    return {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}


def _causal_context(inputs: list[dict]) -> float:
    """Mean keys attended per real token under causal attention over batches of model kwargs: the
    k-th real token of its row (padding not counted) attends k keys, so an unpadded row of L tokens
    averages (L+1)/2."""
    keys = tokens = 0
    for batch in inputs:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.long)
        keys += int((mask.cumsum(-1) * mask).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("no real tokens to take the attention context from")
    return keys / tokens


def _default_context(model: nn.Module, inputs: list[dict], context: float | None) -> float | None:
    """`context`, or for a model with attention the causal mean of the measured tokens (what its
    forward computed); None for an attention-free model (nothing depends on it)."""
    if context is not None or not has_attention(model):
        return context
    return _causal_context(inputs)


def _is_spiking(model: nn.Module) -> bool:
    """The model has neurons and runs them (config.spiking not switched off)."""
    return any(True for _ in iter_neurons(model)) and bool(getattr(model.config, "spiking", True))


@torch.no_grad()
def measure(model: nn.Module, batches, cost: CostTable = HOROWITZ_45NM, context: float | None = None
            ) -> tuple[EnergyReport, SpikeStats | None]:
    """Spike counts and energy per token of ``model`` on held-out tokens, as deployed (eval mode).

    ``batches``: one ``input_ids [B, L]`` tensor, or a list of such tensors or of dicts with
    ``input_ids`` and ``attention_mask`` (padding is then not counted). One forward per batch,
    without a cache, inside one ``count_spikes`` tally; a dense model needs no forward and gets
    ``None`` for the stats. ``context``: keys attended per token by attention layers (None: the
    causal mean over the batches' real tokens, `_causal_context`). Returns
    ``(EnergyReport, SpikeStats | None)``.
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
    return energy_report(model, stats, tokens, cost, context=_default_context(model, inputs, context)), stats


def estimate_energy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cost: CostTable = HOROWITZ_45NM,
    stats: SpikeStats | None = None,
    context: float | None = None,
) -> EnergyReport:
    """Energy per token of ``model`` (HF MambaForCausalLM or SpikingMambaForCausalLM).

    input_ids / attention_mask ``[B, L]``: the tokens over which spikes are measured (a dense
    model needs no forward). ``stats``: spike counts already collected on these tokens (skips
    the forward). Spiking models are measured as deployed: SGC bypasses are not counted, so a
    neuron with ``sgc_lambda != 0`` is listed in the notes. ``context``: as in `measure` (None: the
    causal mean over these tokens).
    """
    inputs = [{"input_ids": input_ids, "attention_mask": attention_mask}]
    if stats is None and _is_spiking(model):
        return measure(model, inputs, cost, context)[0]
    context = _default_context(model, inputs, context)
    return energy_report(model, stats, _count_tokens(input_ids, attention_mask), cost, context=context)


def _neuron_rates(record: dict, channels: int) -> PlacementRates:
    """One neuron's per-channel, per-token rates from its SpikeStats record."""
    per = record["tokens"] * channels
    return PlacementRates(record["abs_sum"] / per, record["nonzero"] / per, record["active"] / per)


def placement_rates(stats: SpikeStats, model: nn.Module) -> dict[str, PlacementRates]:
    """Placement -> its spike rates per channel per token, averaged over the model's layers: what
    `project` needs to count the same placements at another shape."""
    widths = {name: neuron.channels for name, neuron in iter_neurons(model)}
    sums: dict[str, list[float]] = {}
    for name, record in stats.by_name().items():
        per = record["tokens"] * widths[name]
        acc = sums.setdefault(record["placement"], [0.0, 0.0, 0.0, 0.0])
        acc[0] += record["abs_sum"]
        acc[1] += record["nonzero"]
        acc[2] += record["active"]
        acc[3] += per
    return {p: PlacementRates(a / n, e / n, act / n) for p, (a, e, act, n) in sums.items()}


def energy_report(
    model: nn.Module,
    stats: SpikeStats | None,
    tokens: int,
    cost: CostTable = HOROWITZ_45NM,
    *,
    rates: dict[str, PlacementRates] | None = None,
    scale: float = 1.0,
    context: float | None = None,
) -> EnergyReport:
    """The per-layer op and byte counts of ``model``, its spiking layers costed from ``stats`` (the
    counts of a forward over ``tokens`` tokens; None for a dense model), or from per-placement
    ``rates`` (a projection: no forward, e.g. a model on the meta device). ``scale`` multiplies
    every spike figure (active fractions capped at 1): the student at ``scale`` × its firing rate,
    for the break-even search. ``context``: keys each token's query attends in the attention
    layers; required when the model has any (no tokens here to take it from), ignored otherwise.
    The spike counts do not depend on it: the same ``stats`` at another context is the energy at
    that context."""
    backbone, blocks = _backbone_layers(model)
    attention = any(_attention(block) is not None for block in blocks)
    if attention and context is None:
        raise ValueError(
            f"energy_report: {type(model).__name__} has attention layers, whose cost grows with the keys each token "
            "attends: pass context= (keys per token), or use measure / estimate_energy, which take it from the tokens"
        )
    if attention and not context > 0:
        raise ValueError(f"energy_report: context must be > 0 keys per token, got {context}")
    memory = cost.memory
    notes = [MEMORY_NOTE if memory is None else "memory traffic counted (methods.md §10)", f"cost table {cost.describe()}"]
    if attention:
        notes.append(f"attention counted at a context of {context:g} keys per token (its cost grows linearly with it)")
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
    if spiking and stats is None and rates is None:
        raise ValueError("energy_report: a spiking model needs the spike counts of a forward over the tokens (use measure)")
    if rates is not None:
        notes.append("projected from per-placement spike rates (no forward at this shape)")

    records = stats.by_name() if spiking and stats is not None else {}

    def rates_of(full_name: str, placement: str, neuron) -> tuple[PlacementRates, float, float]:
        """(the neuron's rates, its nonzero events and elements per token: the firing-rate parts)."""
        elements = neuron.channels * (neuron.top_level if neuron.kind == "atmn" else 1)
        if rates is not None:
            if placement not in rates:
                raise ValueError(f"project: no measured rates for placement {placement!r} (have {sorted(rates)})")
            rate = rates[placement].scaled(scale)
            return rate, rate.events * neuron.channels, elements
        record = records.get(full_name)
        if record is None or record["tokens"] == 0:
            raise RuntimeError(f"neuron {full_name!r} recorded no spikes during the forward: is it bypassed?")
        rate = _neuron_rates(record, neuron.channels).scaled(scale)
        if scale == 1.0:  # the measured counts themselves (exact integers over the measured tokens)
            return rate, record["nonzero"], record["elements"]
        return rate, rate.events * neuron.channels, elements

    layers: list[LayerEnergy] = []
    fr_nonzero, fr_elements = 0.0, 0.0
    for index, block in enumerate(blocks):
        block_rates: dict[str, PlacementRates] = {}
        neuron_steps: dict[str, tuple[int, int]] = {}
        nonzero, elements = 0.0, 0.0
        if spiking:
            prefix = _module_name(model, block)
            for rel_name, neuron in iter_neurons(block):
                placement = neuron_placement(rel_name)
                if placement not in MODULE_OPS:
                    raise ValueError(f"neuron {rel_name!r} in layer {index}: unknown placement {placement!r}")
                rate, events, count = rates_of(f"{prefix}.{rel_name}" if prefix else rel_name, placement, neuron)
                block_rates[placement] = rate
                neuron_steps[placement] = (neuron.channels, neuron.top_level)  # micro-steps: D or T
                nonzero, elements = nonzero + events, elements + count
        fr_nonzero, fr_elements = fr_nonzero + nonzero, fr_elements + elements
        layers.append(
            LayerEnergy(
                name=f"layers.{index}",
                index=index,
                ops=_block_ops(block, block_rates, neuron_steps, memory, context),
                cost=cost,
                spikes_per_token={p: r.spikes * neuron_steps[p][0] for p, r in block_rates.items()},
                firing_rate=(nonzero / elements) if elements else None,
            )
        )

    head, nonzero, elements = _head_layer(model, backbone, cost, spiking, rates_of)
    layers.append(head)
    fr_nonzero, fr_elements = fr_nonzero + nonzero, fr_elements + elements
    ops_counted = sorted({op for layer in layers for op in layer.ops})
    notes.append(
        "transcendental functions (exp, softplus, sigmoid) count as one Mul each; "
        "the embedding lookup is memory only"
    )
    if not spiking:
        firing = None
    elif rates is None and scale == 1.0:
        firing = stats.firing_rate
    else:
        firing = fr_nonzero / fr_elements if fr_elements else None
    return EnergyReport(cost, layers, tokens, spiking, firing, ops_counted, notes, context if attention else None)


def _head_layer(model: nn.Module, backbone: nn.Module, cost: CostTable, spiking: bool, rates_of) -> tuple[LayerEnergy, float, float]:
    """(norm_f, the optional head neuron, the LM head and the embedding lookup (memory only); the
    head neuron's nonzero events and elements per token, 0 without one)."""
    memory = cost.memory
    d = model.lm_head.in_features
    ops = {"norm_f": rms_norm_ops(d, memory)}
    neurons = getattr(backbone, "neurons", None)
    head_neuron = neurons["head_input"] if neurons is not None and "head_input" in neurons else None
    rate = None
    nonzero = elements = 0.0
    if spiking and head_neuron is not None:
        prefix = _module_name(model, backbone)
        rate, nonzero, elements = rates_of(f"{prefix}.neurons.head_input", "head", head_neuron)
        ops["head.neuron"] = neuron_ops(head_neuron.channels, head_neuron.top_level, memory)
    ops["lm_head"] = _linear(model.lm_head, rate, memory)
    if memory is not None:  # one embedding row per token, from DRAM (never shared across a batch)
        ops["embedding"] = OpCount(dram_bytes=float(d * memory.weight_bytes))
    if rate is None:
        return LayerEnergy(name="head", index=None, ops=ops, cost=cost), 0.0, 0.0
    layer = LayerEnergy(name="head", index=None, ops=ops, cost=cost, spikes_per_token={"head": rate.spikes * d},
                        firing_rate=nonzero / elements)
    return layer, nonzero, elements


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
    context: float | None = None,
) -> float:
    """Energy benefit ``E_teacher / E_student`` per token, both measured on the same tokens (and, for
    attention layers, at the same ``context``: None = the causal mean over these tokens)."""
    e_teacher = estimate_energy(teacher, input_ids, attention_mask, cost, context=context).pj_per_token
    e_student = estimate_energy(student, input_ids, attention_mask, cost, context=context).pj_per_token
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


def project(config, rates: dict[str, PlacementRates], cost: CostTable = HOROWITZ_45NM,
            context: float | None = None) -> EnergyReport:
    """Energy per token of a model of `config` (a SpikingMambaConfig, any size) whose neurons fire
    at the measured per-placement `rates`: built on the meta device (no weights), counted with the
    same `energy_report`, at `context` keys per token if the config has attention layers. A
    projection, labelled as one in its notes."""
    from spiking.modeling import SpikingMambaForCausalLM

    with torch.device("meta"):
        model = SpikingMambaForCausalLM(config)
    return energy_report(model, None, 1, cost, rates=rates, context=context)


def break_even(teacher_pj: float, model: nn.Module, stats: SpikeStats, cost: CostTable, tol: float = 1e-4,
               context: float | None = None) -> float | None:
    """The overall firing rate at which the student's energy per token under `cost` equals
    `teacher_pj` (its measured spike figures scaled by one factor k; bisection on k), or None when
    even zero spikes cost more than the teacher (the dense rest alone does), or 1.0 when the student
    is cheaper at every firing rate up to 1 (every element spiking). `context`: the attention
    layers' keys per token (a hybrid student; the one `teacher_pj` was counted at)."""
    def energy(k: float) -> float:
        return energy_report(model, stats, 1, cost, scale=k, context=context).pj_per_token

    rate = stats.firing_rate
    if energy(0.0) >= teacher_pj:
        return None
    low, high = 0.0, 1.0 / rate if rate > 0 else 1.0  # k at a firing rate of 1: every element spikes
    if energy(high) < teacher_pj:
        return 1.0  # cheaper than the teacher at every firing rate up to 1
    while high - low > tol * high:
        mid = (low + high) / 2
        low, high = (mid, high) if energy(mid) < teacher_pj else (low, mid)
    return rate * (low + high) / 2


def spike_costs(model: nn.Module, cost: CostTable = HOROWITZ_45NM) -> dict[str, float]:
    """Neuron module name -> pJ one of its spikes costs downstream: the ACs it triggers (one per
    output of every linear layer it feeds, `MODULE_OPS`) at `cost`'s AC energy. What a spike-energy
    penalty weighs each neuron's spikes by (methods.md §9): an in_proj spike adds 2E weights, a
    dt_proj spike E, a head spike the whole vocabulary (an in_proj spike 2E + 2N with bc_proj)."""
    modules = dict(model.named_modules())
    costs = {}
    for name, neuron in iter_neurons(model):
        placement = neuron_placement(name)
        owner = modules[name.rsplit(".neurons.", 1)[0]]  # the mixer, the MLP or the backbone
        if placement == "head":
            fan_out = model.get_output_embeddings().out_features
        elif placement == "mlp.up":
            fan_out = owner.gate_proj.out_features + owner.up_proj.out_features
        elif placement == "mlp.down":
            fan_out = owner.down_proj.out_features
        else:
            fan_out = getattr(owner, placement).out_features
            if placement == "in_proj" and getattr(owner, "bc_proj", None) is not None:
                fan_out += owner.bc_proj.out_features  # the same spikes feed bc_proj
        costs[name] = fan_out * cost.ac_pj
    return costs
