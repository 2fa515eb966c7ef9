"""Fused one-token decode step on CPU: every block of the backbone for one new token in one C++ call.

Cached generation (`model.generate`, TRL's rollouts, evaluation) spends its time in the one-token
step. Through the modules that step is ~40 small PyTorch ops per block (norm, neuron, in_proj,
conv window, x_proj, dt_proj, the state update, gate, neuron, out_proj, residual), each a few µs
of dispatch for a few µs of work, so Python overhead grew with the number of layers. Here
`spikerl_cpu::backbone_step` (spiking/cpu_kernels.cpp) runs all blocks for the token:
RMSNorm, the neurons (SI-LIF / ATMN closed form, SGC; on in_proj, x_proj, dt_proj, out_proj, the
MLP and the LM head's input), the projections, the causal conv on the cached window, Δ's softplus,
the state update vectorised over N, the gate and the residual, updating the cache's conv and SSM
states in place. A projection fed by a neuron is spike-driven when few enough of its inputs fired
(`spike_linear`: only the W^T rows of nonzero inputs are read; up to 70% of them at batch <= 16,
45% above, the crossing measured by benchmarks/spike_linear.py), else it is ATen's own matmul
(the very call `F.linear` makes); `head_logits` does the same for the LM head after the step. It
computes what the per-layer path computes (tested: same logits within fp32 rounding, same greedy
tokens). A spike-driven sum adds in another order than the dense matmul, so a neuron input within
rounding of a level boundary can spike one level apart downstream: a spiking model is
discontinuous there, and a generated token can then differ (README, Benchmarks).

It runs when it can do exactly what the modules would, else the per-layer path runs (the reason is
logged once): CPU fp32, no autograd, scan backend resolving to "cpu", a DynamicCache whose layers
all hold a state, plain nn.Linear / nn.Conv1d modules without hooks (so not under PEFT adapters or
ZeRO-3 partitioning), neurons SI-LIF or ATMN with tau = 1 that are not counting spikes or updating
thresholds (ATA), no hidden states requested. The plan (the list of tensors the C++ step reads)
is built at the first step of a cache, kept on the cache and reused for its later steps; it is
rebuilt when a threshold or A_log changes in place, a neuron's levels or SGC λ change, or the
cache's state tensors are replaced (beam search reorders them). Per token the Python left is that check, ~1 µs a layer.
The W^T copies are kept on the cache, so they are made once per cache (per `generate` call: a few
ms at d256 x 4) and double the memory of the spiking projections' weights while it generates. Kept
across calls they would go stale when a weight is written through `.data` (PEFT's LoRA merge does),
which no version counter sees.

Tests: `OMP_NUM_THREADS=1 python -m pytest tests/test_cpu_kernels.py -q`.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from .kernels import resolve_backend
from .neurons import ATMN, NEURON_MODULE_NAMES, SILIF

logger = logging.getLogger(__name__)

# One block's entries in the C++ step's tensor list; the order of `enum Slot` in cpu_kernels.cpp.
SLOTS = (
    "norm", "in_V", "in_w", "in_b", "conv_w", "conv_b", "conv_state", "x_V", "x_w", "dt_V", "dt_w", "dt_b", "A",
    "Dskip", "ssm_state", "out_V", "out_w", "out_b", "mlp_norm", "up_V", "gate_w", "up_w", "down_V", "down_w",
    "in_wt", "out_wt", "gate_wt", "up_wt", "down_wt",
)
NEURON_IDS = {None: 0, "si_lif": 1, "atmn": 2}
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info("one-token step: %s", message)


def _plain(module: nn.Module, kind: type) -> bool:
    """An unwrapped module of exactly that type, with no hooks a fused step would bypass."""
    return (
        type(module) is kind
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and module.weight is not None
        and not hasattr(module.weight, "ds_id")  # DeepSpeed ZeRO-3 partitions weights behind hooks
    )


# The neurons the step knows, by owner: {ModuleDict key: config placement}. A neuron the model holds
# under any other name makes the step stand aside: it must never run a model without its neurons.
# The LM head's neuron is the backbone's: the step applies it to norm_f's output.
MIXER_NEURONS = {NEURON_MODULE_NAMES[p]: p for p in ("in_proj", "x_proj", "dt_proj", "out_proj")}
MLP_NEURONS = {NEURON_MODULE_NAMES[p]: p for p in ("mlp.up", "mlp.down")}
BACKBONE_NEURONS = {NEURON_MODULE_NAMES["head"]: "head"}


def _check_neuron_names(owner: nn.Module, known: dict[str, str], where: str) -> None:
    neurons = getattr(owner, "neurons", None)
    held = set(neurons.keys()) if isinstance(neurons, nn.ModuleDict) else set()
    placements = set(owner.config.neurons) & set(known.values())
    if held - set(known) or {key for key, placement in known.items() if placement in placements} - held:
        raise _Unsupported(f"{where}: neurons {sorted(held)} do not match the placements the step knows")


def _neuron(owner: nn.Module, key: str) -> tuple[int, int, float, torch.Tensor | None, nn.Module | None] | str:
    """(kind id, levels, SGC λ, V, module) of the neuron `key` of `owner` (kind 0: none), or why not."""
    neurons = getattr(owner, "neurons", None)
    if not owner.config.spiking or neurons is None or key not in neurons:
        return 0, 0, 0.0, None, None
    neuron = neurons[key]
    if type(neuron) not in (SILIF, ATMN):
        return f"neuron {key} is a {type(neuron).__name__}"
    if isinstance(neuron, ATMN) and neuron.tau != 1.0:
        return f"neuron {key} is ATMN with tau {neuron.tau} (the step loop)"
    if neuron.is_counting:
        return "spikes are being counted"
    if neuron.training and neuron.ata_momentum > 0:
        return "ATA updates thresholds in training mode"
    if neuron._forward_hooks or neuron._forward_pre_hooks:
        return f"neuron {key} has hooks"
    V = neuron.threshold().detach().float().contiguous()
    return NEURON_IDS[neuron.kind], int(neuron.levels()), float(neuron.sgc_lambda), V, neuron


class _Plan:
    """The C++ step's arguments for one backbone and one cache (states by reference)."""

    def __init__(self, backbone: nn.Module, cache, batch: int):
        self.backbone_ref = weakref.ref(backbone)
        self.tensors: list[torch.Tensor | None] = []
        self.ints: list[int] = [len(backbone.layers)]
        self.floats: list[float] = [float(backbone.norm_f.variance_epsilon)]
        self.sources: list[tuple[torch.Tensor, int]] = []  # (parameter, version) the derived tensors came from
        self.neurons: list[tuple[nn.Module, int, float]] = []  # (neuron, levels, SGC λ) as planned
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []  # the cache's (conv, SSM) state per layer
        self.error: str | None = None
        self.stepped: torch.Tensor | None = None  # the step's last output
        self.spiking_head = False  # a neuron feeds the LM head: its projection may be spike-driven
        try:
            for index, block in enumerate(backbone.layers):
                self._add_block(index, block, cache, batch)
            if not _plain_norm(backbone.norm_f):
                raise _Unsupported("norm_f is not a plain RMSNorm")
            self.tensors.append(backbone.norm_f.weight.detach())
            _check_neuron_names(backbone, BACKBONE_NEURONS, "the LM head")
            head_V, head_i, head_l = self._neuron_slot(backbone, NEURON_MODULE_NAMES["head"])
            self.tensors.append(head_V)
            self.spiking_head = head_V is not None
            self.ints += head_i
            self.floats.append(head_l)
        except _Unsupported as why:
            self.error = str(why)

    def _weight_t(self, weight: torch.Tensor, cache) -> torch.Tensor:
        self._source(weight)
        return _weight_t(weight, cache)

    def _source(self, parameter: torch.Tensor) -> None:
        self.sources.append((parameter, parameter._version))

    def _neuron_slot(self, owner: nn.Module, key: str) -> tuple[torch.Tensor | None, list[int], float]:
        found = _neuron(owner, key)
        if isinstance(found, str):
            raise _Unsupported(found)
        kind, levels, lam, V, module = found
        if module is not None:
            self.neurons.append((module, levels, lam))
            self._source(module._log_threshold())
        return V, [kind, levels], lam

    def _add_block(self, index: int, block: nn.Module, cache, batch: int) -> None:
        mixer = block.mixer
        if not _plain_norm(block.norm):
            raise _Unsupported(f"layer {index}: the norm is not a plain RMSNorm")
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            if not _plain(getattr(mixer, name), nn.Linear):
                raise _Unsupported(f"layer {index}: {name} is wrapped or hooked ({type(getattr(mixer, name)).__name__})")
        if not _plain(mixer.conv1d, nn.Conv1d):
            raise _Unsupported(f"layer {index}: conv1d is wrapped or hooked")
        if mixer._forward_hooks or mixer._forward_pre_hooks or block._forward_hooks or block._forward_pre_hooks:
            raise _Unsupported(f"layer {index}: the block has hooks")
        if cache.is_recording_past(index):
            raise _Unsupported("the cache records past states")
        conv_state = cache.get_conv_state(index)
        ssm_state = cache.get_recurrent_state(index)
        if conv_state is None or ssm_state is None:
            raise _Unsupported(f"layer {index}: the cache holds no state yet")
        for state in (conv_state, ssm_state):
            if state.dtype != torch.float32 or not state.is_contiguous() or state.shape[0] != batch:
                raise _Unsupported("the cache's states are not contiguous fp32 of this batch")
        self.states.append((conv_state, ssm_state))

        _check_neuron_names(mixer, MIXER_NEURONS, f"layer {index}")
        in_V, in_i, in_l = self._neuron_slot(mixer, NEURON_MODULE_NAMES["in_proj"])
        x_V, x_i, x_l = self._neuron_slot(mixer, NEURON_MODULE_NAMES["x_proj"])
        dt_V, dt_i, dt_l = self._neuron_slot(mixer, NEURON_MODULE_NAMES["dt_proj"])
        out_V, out_i, out_l = self._neuron_slot(mixer, NEURON_MODULE_NAMES["out_proj"])
        self._source(mixer.A_log)
        A = -torch.exp(mixer.A_log.detach().float())  # as the mixer computes it
        dim = mixer.intermediate_size
        entries = {
            "norm": block.norm.weight, "in_V": in_V, "in_w": mixer.in_proj.weight, "in_b": mixer.in_proj.bias,
            "conv_w": mixer.conv1d.weight.reshape(dim, -1), "conv_b": mixer.conv1d.bias, "conv_state": conv_state,
            "x_V": x_V, "x_w": mixer.x_proj.weight, "dt_V": dt_V, "dt_w": mixer.dt_proj.weight, "dt_b": mixer.dt_proj.bias,
            "A": A.contiguous(), "Dskip": mixer.D, "ssm_state": ssm_state, "out_V": out_V, "out_w": mixer.out_proj.weight,
            "out_b": mixer.out_proj.bias,
        }
        # spikes in: W^T for the spike-driven projection (the step picks it when few inputs fired)
        for V, name, linear in ((in_V, "in_wt", mixer.in_proj), (out_V, "out_wt", mixer.out_proj)):
            if V is not None:
                entries[name] = self._weight_t(linear.weight, cache)
        mlp_i, mlp_l, mlp_eps = [0, 0, 0, 0], [0.0, 0.0], 0.0
        if block.mlp is not None:
            mlp = block.mlp
            if not _plain_norm(block.mlp_norm) or mlp._forward_hooks or mlp._forward_pre_hooks:
                raise _Unsupported(f"layer {index}: the MLP is hooked or its norm is not plain")
            for name in ("gate_proj", "up_proj", "down_proj"):
                if not _plain(getattr(mlp, name), nn.Linear) or getattr(mlp, name).bias is not None:
                    raise _Unsupported(f"layer {index}: mlp.{name} is wrapped, hooked or has a bias")
            _check_neuron_names(mlp, MLP_NEURONS, f"layer {index} MLP")
            up_V, up_i, up_l = self._neuron_slot(mlp, NEURON_MODULE_NAMES["mlp.up"])
            down_V, down_i, down_l = self._neuron_slot(mlp, NEURON_MODULE_NAMES["mlp.down"])
            entries |= {"mlp_norm": block.mlp_norm.weight, "up_V": up_V, "gate_w": mlp.gate_proj.weight,
                        "up_w": mlp.up_proj.weight, "down_V": down_V, "down_w": mlp.down_proj.weight}
            for V, name, linear in ((up_V, "gate_wt", mlp.gate_proj), (up_V, "up_wt", mlp.up_proj),
                                    (down_V, "down_wt", mlp.down_proj)):
                if V is not None:
                    entries[name] = self._weight_t(linear.weight, cache)
            mlp_i, mlp_l, mlp_eps = up_i + down_i, [up_l, down_l], float(block.mlp_norm.variance_epsilon)
        for name in SLOTS:
            value = entries.get(name)
            if value is not None:
                if value.dtype != torch.float32:
                    raise _Unsupported(f"layer {index}: {name} is {value.dtype}, the fused step is fp32")
                value = value.detach()
            self.tensors.append(value)
        self.ints += in_i + x_i + out_i + mlp_i + dt_i
        self.floats += [float(block.norm.variance_epsilon), mlp_eps, in_l, x_l, out_l, *mlp_l, dt_l]

    def stale(self, backbone: nn.Module, cache) -> bool:
        """True when this plan no longer describes the model and its cache (then it is rebuilt).

        The cache's state tensors are compared by identity: beam search (`reorder_cache`) and
        offloading replace them, and the step must update the tensors the cache holds.
        """
        return (
            self.backbone_ref() is not backbone
            or any(parameter._version != version for parameter, version in self.sources)
            or any(
                neuron.is_counting or neuron.levels() != levels or neuron.sgc_lambda != lam
                for neuron, levels, lam in self.neurons
            )
            or any(
                cache.get_conv_state(i) is not conv or cache.get_recurrent_state(i) is not ssm
                for i, (conv, ssm) in enumerate(self.states)
            )
        )


class _Unsupported(Exception):
    pass


def _weight_t(weight: torch.Tensor, cache) -> torch.Tensor:
    """W^T [in, out], contiguous, for the spike-driven projection; kept on the cache, so a plan made
    again for the same cache (beam search replaces its states every step) does not copy it again."""
    held = cache.__dict__.setdefault("_spikerl_weight_t", {})
    entry = held.get(id(weight))
    if entry is None or entry[0] is not weight or entry[1] != weight._version:
        entry = held[id(weight)] = (weight, weight._version, weight.detach().t().contiguous())
    return entry[2]


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm).__name__ == "SpikingMambaRMSNorm" and not norm._forward_hooks and not norm._forward_pre_hooks


def decode_step(backbone: nn.Module, hidden: torch.Tensor, cache, attention_mask=None) -> torch.Tensor | None:
    """The backbone's normed output [B, 1, H] for one token `hidden` [B, 1, H], or None (then the caller
    runs the per-layer path). Updates the cache's states in place, as that path does."""
    if torch.is_grad_enabled() or hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return None  # training, GPU, half precision: the modules' path (no log: not a generation step)
    if attention_mask is not None and not bool(attention_mask.all()):
        _log_once("per-layer path (a padded new token)")
        return None
    if resolve_backend(backbone.config.scan_backend, hidden.device) != "cpu":
        return None  # the ref backend was asked for (or the extension did not build: logged there)
    # kept on the cache, so that the plan (which holds the cache's states) lives as long as it
    plan: _Plan | None = getattr(cache, "_spikerl_fused_step", None)
    if plan is None or plan.stale(backbone, cache):
        plan = _Plan(backbone, cache, hidden.shape[0])
        cache._spikerl_fused_step = plan
        _log_once("fused C++ backbone step" if plan.error is None else f"per-layer path ({plan.error})")
    if plan.error is not None:
        return None
    out = torch.ops.spikerl_cpu.backbone_step(hidden.reshape(hidden.shape[0], -1), plan.tensors, plan.ints, plan.floats)
    plan.stepped = out.unsqueeze(1)  # what head_logits may project spike-driven (the head neuron's spikes)
    return plan.stepped


def head_logits(lm_head: nn.Module, hidden: torch.Tensor, cache) -> torch.Tensor | None:
    """The LM head's logits [B, 1, V] for the fused step's output `hidden` [B, 1, H] (the head neuron's
    spikes), spike-driven when few enough of them fired (`spikerl_cpu::project`, as the step's own
    projections); None when the step did not run for this token or the head is not a plain fp32
    nn.Linear (then the module runs). Same sums as the module; only the order of the additions differs."""
    plan: _Plan | None = getattr(cache, "_spikerl_fused_step", None) if cache is not None else None
    if plan is None or plan.error is not None or not plan.spiking_head or plan.stepped is None:
        return None
    stepped = plan.stepped  # held by the plan, so its memory is not reused: same pointer, same tensor
    if hidden.data_ptr() != stepped.data_ptr() or hidden.shape != stepped.shape or hidden.stride() != stepped.stride():
        return None
    if not _plain(lm_head, nn.Linear) or lm_head.weight.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    x = hidden.reshape(hidden.shape[0], -1)
    weight = lm_head.weight.detach()
    bias = lm_head.bias.detach() if lm_head.bias is not None else None
    logits = torch.ops.spikerl_cpu.project(x, weight, _weight_t(lm_head.weight, cache), bias)
    return logits.unsqueeze(1)
