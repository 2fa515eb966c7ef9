"""Spiking neurons: SI-LIF (SpikingMamba) and ATMN (MAR), with SGC and spike counting.

Each neuron turns an activation ``x [..., C]`` into integer spikes and hands the next linear
layer ``y = (spike count) · threshold``. Two forms of every neuron (methods.md §2, §5, §7):

* ``forward``: the closed-form training map (SNN2ANN's "spiking mapping"): one pass, no
  micro-step loop, straight-through / surrogate gradients. This is what training runs.
* ``simulate``: the step-by-step spike simulation (SI-LIF: D binary micro-steps; ATMN: T
  ternary steps with leak tau). Same values as ``forward`` (tested bit-for-bit); used for
  inference-style checks, spike trains and the SNN2ANN benchmark. ``simulate_steps`` gives the
  per-step output events ``[S, ..., C]`` a spike-driven next layer would consume.

Gradient conventions (documented here once):

* SI-LIF: ``∂y/∂x = 1`` where ``-D <= x/V <= D``, else 0 (straight-through inside the clip
  range). ``∂y/∂V = s - x/V`` inside, ``s`` (= ±D) outside: the LSQ rule (Esser et al. 2020).
* ATMN: rectangular surrogate of width ``V_th`` around each threshold ``±k·V_th``. With tau = 1
  the rectangles tile ``0.5 <= |x|/V_th <= T + 0.5``, so ``∂y/∂x = 1`` there and 0 elsewhere
  (also below half a threshold: the dead zone of a real ternary neuron); ``∂y/∂V_th`` follows the
  same LSQ form; ``a = log V_th`` receives ``V_th · ∂y/∂V_th``.
* LSQ gradient scale (``lsq_grad_scale=True``, default): the threshold's gradient is multiplied by
  ``g = 1 / sqrt(n · Q)``, ``n`` = elements per channel in the batch (numel / C), ``Q`` = D (SI-LIF)
  or T (ATMN). It changes only the gradient, never the forward value.
* Thresholds are stored as logs (``log_V``, ``a``) and exponentiated, so no optimizer step can
  make them <= 0.

SGC (methods.md §3): ``y = (1 - λ)·spiking_y + λ·x`` with ``λ = module.sgc_lambda``; λ == 0 takes
the plain code path (bit-identical).

Spike counting: ``with count_spikes(model) as stats: model(**batch)``. Outside the context each
neuron's forward only checks one empty list (no hooks, no extra tensor ops).

Shapes: ``[..., C]`` = any leading dims (usually ``[B, L, C]``), C channels; spike trains are
``[T, ..., C]``.

Run the tests: ``OMP_NUM_THREADS=1 python -m pytest tests/test_neurons.py -q``
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator
from torch import nn

__all__ = [
    "SILIF",
    "ATMN",
    "DEFAULT_D",
    "DEFAULT_T",
    "NEURON_KINDS",
    "NeuronSpec",
    "make_neuron",
    "inherit_threshold",
    "count_spikes",
    "SpikeStats",
    "set_sgc_lambda",
    "iter_neurons",
    "neuron_placement",
    "NEURON_MODULE_NAMES",
    "layer_index",
    "si_lif",
    "atmn_closed_form",
    "abs_percentile",
]

DEFAULT_D = 4  # SI-LIF levels per sign (SpikingMamba's choice); the one place this default lives
DEFAULT_T = 4  # ATMN steps per token (MAR's choice)
CALIBRATION_PERCENTILE = 0.999  # 99.9th percentile of |x| maps to the top spike level
_LOG_THRESHOLD_BOUND = 30.0  # thresholds live in [e^-30, e^30]: positive and finite in fp32/bf16


# ---------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------


def _check_int_at_least_one(value, name: str) -> int:
    # bool is an int subclass: D=True would silently mean D=1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_momentum(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"ata_momentum must be a float in [0, 1), got {value!r}")
    return float(value)


class _GradScale(torch.autograd.Function):
    """Identity forward (exact: the same values), gradient multiplied by ``scale``.

    Not ``(t - t·g).detach() + t·g``: that changes the value by rounding, and a threshold one
    ulp off would move ties between the training and the counting forms.
    """

    @staticmethod
    def forward(ctx, t, scale: float):
        ctx.scale = scale
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scale_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``scale`` (LSQ's gradient scale)."""
    if scale == 1.0:
        return t
    return _GradScale.apply(t, scale)


def _reduce_to_channels(grad: torch.Tensor, channels: int) -> torch.Tensor:
    """Sum a gradient ``[..., C]`` over every leading dim -> ``[C]`` (V broadcasts on the last dim)."""
    return grad.reshape(-1, channels).sum(0)


def abs_percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-channel ``q``-quantile of ``|x|`` for ``x [M, C]`` -> ``[C]`` (float32).

    Same linear interpolation as ``torch.quantile``, but through ``kthvalue`` so it has no input
    size limit (``torch.quantile`` refuses more than 2**24 elements).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [M, C], got shape {tuple(x.shape)}")
    a = x.detach().float().abs()
    m = a.shape[0]
    if m == 0:
        raise ValueError("x must contain at least one row (M = 0)")
    pos = q * (m - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    v_lo = a.kthvalue(lo + 1, dim=0).values
    if hi == lo:
        return v_lo
    v_hi = a.kthvalue(hi + 1, dim=0).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _threshold_from_percentile(x: torch.Tensor, top_level: int) -> torch.Tensor:
    """``[..., C]`` activations -> per-channel threshold ``p99.9(|x|) / top_level`` ``[C]``.

    A channel that was all zero in the calibration data gets the median threshold of the other
    channels (1.0 if every channel is zero): a tiny threshold would turn any later non-zero input
    into saturated spikes.
    """
    x2d = x.reshape(-1, x.shape[-1])
    p = abs_percentile(x2d, CALIBRATION_PERCENTILE)
    live = p > 0
    fallback = p[live].median() if live.any() else torch.ones((), device=p.device)
    p = torch.where(live, p, fallback)
    return p / top_level


# ---------------------------------------------------------------------------------------------
# SI-LIF: closed form (autograd.Function) and micro-step simulation
# ---------------------------------------------------------------------------------------------


def _si_lif_counts(u: torch.Tensor, D: int) -> torch.Tensor:
    """Signed integer spike counts from ``u = x / V``: ``sign(u)·min(floor(|u| + 0.5), D)``.

    ``floor(|u| + 0.5)`` is round-half-away-from-zero, written with the very float ops of the
    micro-step form (``v0 = |u| + 0.5``) so the two agree bit-for-bit, ties included.
    """
    return torch.sign(u) * torch.floor(u.abs() + 0.5).clamp_max(D)


class _SILIFFunction(torch.autograd.Function):
    """``(x [..., C], V [C]) -> (y = s·V, s)``; straight-through for x, LSQ for V.

    Only x and V are saved: u and the in-range mask are recomputed in backward (cheap,
    elementwise), which keeps training memory at one activation per neuron.
    """

    @staticmethod
    def forward(ctx, x, V, D: int):
        u = x / V
        s = _si_lif_counts(u, D)
        y = (s * V).to(x.dtype)
        ctx.save_for_backward(x, V)
        ctx.D = D
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, grad_y, grad_s):
        x, V = ctx.saved_tensors
        u = x / V
        inside = u.abs() <= ctx.D
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            s = _si_lif_counts(u, ctx.D)
            # LSQ: d(s·V)/dV = s - u inside the range (round treated as identity), s outside
            dy_dv = torch.where(inside, s - u, s)
            grad_v = _reduce_to_channels(grad_y * dy_dv, V.shape[-1]).to(V.dtype)
        return grad_x, grad_v, None


def si_lif(x: torch.Tensor, V: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form SI-LIF: ``x [..., C]``, ``V [C] > 0`` -> ``(y [..., C], s [..., C])``.

    ``s = clip(round_half_away(x / V), -D, D)`` (float tensor holding integers), ``y = s·V``.
    Gradients: straight-through for x inside ``|x/V| <= D``; LSQ for V (no gradient scale here).
    """
    return _SILIFFunction.apply(x, V, D)


class _Heaviside(torch.autograd.Function):
    """``b = (v >= 1)``; rectangular surrogate ``∂b/∂v = 1`` for ``|v - 1| <= 0.5``.

    Used by the micro-step simulation. Unrolled through D steps with the soft reset, these
    surrogates give ∂y/∂x = 1 exactly on the closed form's straight-through range.
    """

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v >= 1).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * ((v - 1).abs() <= 0.5)


class _TernarySpike(torch.autograd.Function):
    """``s = +1 if h >= 1, -1 if h <= -1, else 0`` (h in units of V_th).

    Rectangular surrogate of width 1 (= V_th in raw units) around each threshold ±1.
    """

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return (h >= 1).to(h.dtype) - (h <= -1).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return grad * ((h.abs() - 1).abs() <= 0.5)


def si_lif_simulate(x: torch.Tensor, V: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-step SI-LIF (methods.md §2): ``(y [..., C], s [..., C])``.

    ``v0 = |x|/V + 0.5``; D micro-steps with no leak and soft reset by subtraction, each firing
    at most one binary event; the sign is carried separately. Differentiable through the loop
    with rectangular surrogates (the "step-by-step" training of the SNN2ANN comparison).
    """
    u = x / V  # |x|/V == |x/V| exactly in IEEE arithmetic: same op as the closed form
    v = u.abs() + 0.5
    count = torch.zeros_like(v)
    for _ in range(D):
        b = _Heaviside.apply(v)
        v = v - b  # soft reset: subtract the threshold (1 in units of V)
        count = count + b
    s = torch.sign(u).detach() * count
    return (s * V).to(x.dtype), s.detach()


# ---------------------------------------------------------------------------------------------
# ATMN: closed form for tau == 1, step loop otherwise
# ---------------------------------------------------------------------------------------------


class _ATMNClosedFunction(torch.autograd.Function):
    """tau == 1: ``(x, V_th) -> (y = c·V_th, c)`` with ``c = clamp(trunc(x/V_th), -T, T)``.

    With no leak the residual never changes sign and each step removes exactly one threshold,
    so T ternary steps fire ``min(floor(|x|/V_th), T)`` times: x truncated toward zero to a
    multiple of V_th and clipped to ±T·V_th. Surrogate: the T rectangles of width V_th around
    the thresholds tile ``0.5 <= |u| <= T + 0.5`` (same gradient as the unrolled loop).
    """

    @staticmethod
    def forward(ctx, x, V, T: int):
        u = x / V
        c = torch.trunc(u).clamp(-T, T)
        y = (c * V).to(x.dtype)
        ctx.save_for_backward(x, V)
        ctx.T = T
        ctx.mark_non_differentiable(c)
        return y, c

    @staticmethod
    def backward(ctx, grad_y, grad_c):
        x, V = ctx.saved_tensors
        u = x / V
        a = u.abs()
        inside = (a >= 0.5) & (a <= ctx.T + 0.5)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            c = torch.trunc(u).clamp(-ctx.T, ctx.T)
            dy_dv = torch.where(inside, c - u, c)
            grad_v = _reduce_to_channels(grad_y * dy_dv, V.shape[-1]).to(V.dtype)
        return grad_x, grad_v, None


def atmn_closed_form(x: torch.Tensor, V_th: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ATMN for tau == 1: ``(y [..., C], total signed count [..., C])``."""
    return _ATMNClosedFunction.apply(x, V_th, T)


def atmn_steps(x: torch.Tensor, V_th: torch.Tensor, T: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ATMN step loop (methods.md §5) -> ``(partial outputs [T, ..., C], spikes [T, ..., C])``.

    The membrane is kept in units of V_th (``h = x / V_th`` injected once at step 0, thresholds
    at ±1), which is the raw recursion divided by V_th: same spikes, and the subtraction of the
    threshold is exact in float, so with tau = 1 it equals the closed form bit-for-bit.

        h_0 = x / V_th;  s_t = +1 if h_t >= 1, -1 if h_t <= -1, else 0
        u_t = h_t - s_t;  h_{t+1} = u_t / tau;  y_t = V_th · Σ_{t' <= t} s_t'
    """
    h = x / V_th
    spikes, partial = [], []
    total = torch.zeros_like(h)
    for t in range(T):
        s = _TernarySpike.apply(h)
        total = total + s
        spikes.append(s)
        partial.append(total)
        if t + 1 < T:
            h = h - s  # soft reset
            if tau != 1.0:
                h = h / tau  # leak between steps
    partial_y = (torch.stack(partial) * V_th).to(x.dtype)
    return partial_y, torch.stack(spikes).detach()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class _SpikingNeuron(nn.Module):
    """What SILIF and ATMN share: SGC mixing, calibration flag, spike recording, ATA."""

    kind: str = ""
    top_level: int = 1  # spike level the 99.9th percentile maps to (D or T)

    def __init__(self, channels: int, learnable: bool, ata_momentum: float, lsq_grad_scale: bool):
        super().__init__()
        self.channels = _check_int_at_least_one(channels, "channels")
        if not isinstance(learnable, bool):
            raise ValueError(f"learnable must be a bool, got {learnable!r}")
        if not isinstance(lsq_grad_scale, bool):
            raise ValueError(f"lsq_grad_scale must be a bool, got {lsq_grad_scale!r}")
        self.ata_momentum = _check_momentum(ata_momentum)
        self.lsq_grad_scale = lsq_grad_scale
        # kept apart from requires_grad: from_pretrained re-creates parameters with requires_grad=True
        self.learnable = learnable
        self.sgc_lambda: float = 0.0
        # saved in state_dict, so a resumed / reloaded model is not re-calibrated
        self.register_buffer("calibrated", torch.tensor(False))
        # active SpikeStats; empty outside count_spikes (the only hot-path cost is this check)
        self._spike_recorders: list[tuple[SpikeStats, str]] = []

    # --- threshold, stored as a log so it stays positive -----------------------------------
    def _log_threshold(self) -> nn.Parameter:
        raise NotImplementedError

    def threshold(self) -> torch.Tensor:
        """The positive per-channel threshold ``[C]`` (V for SI-LIF, V_th for ATMN).

        The log is clamped to ±30 so that even an absurd optimizer step leaves a finite
        threshold > 0 (exp would underflow to 0 or overflow to inf in float32).
        """
        log_t = self._log_threshold()
        if not self.learnable:
            log_t = log_t.detach()  # frozen even where a reload turned requires_grad back on
        return log_t.clamp(-_LOG_THRESHOLD_BOUND, _LOG_THRESHOLD_BOUND).exp()

    def threshold_for(self, x: torch.Tensor) -> torch.Tensor:
        """The threshold ``[C]`` as this forward uses it on input ``x``: with LSQ's gradient scale
        ``1/sqrt(n·top_level)`` when ``lsq_grad_scale`` (same value; only the gradient differs).
        What a fused kernel must be given to train the threshold exactly like ``forward``."""
        V = self.threshold()
        if self.lsq_grad_scale:
            per_channel = max(x.numel() // self.channels, 1)
            V = _scale_grad(V, 1.0 / math.sqrt(per_channel * self.top_level))
        return V

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor) -> None:
        """Set the threshold so the 99.9th percentile of ``|x|`` maps to the top spike level.

        ``x [M, C]`` (any ``[..., C]`` is flattened): SI-LIF ``V = p/D``, ATMN ``V_th = p/T``.
        """
        if x.shape[-1] != self.channels:
            raise ValueError(f"calibration x has {x.shape[-1]} channels, neuron has {self.channels}")
        self.set_threshold_(_threshold_from_percentile(x, self.top_level))

    @torch.no_grad()
    def set_threshold_(self, V: torch.Tensor) -> None:
        """Set the per-channel threshold to ``V [C]`` (> 0) and mark the neuron calibrated."""
        log_t = self._log_threshold()
        log_t.copy_(V.float().log().to(log_t.dtype))
        self.calibrated.fill_(True)

    @property
    def is_counting(self) -> bool:
        """True inside a ``count_spikes`` block over this neuron (its forward then records spikes)."""
        return bool(self._spike_recorders)

    def levels(self) -> int:
        """The largest spike count this forward can emit per element: D (SI-LIF), or the ATMN steps
        that run now (T, or SBDS's ``active_steps``)."""
        return self.top_level

    @torch.no_grad()
    def _ata_update(self, x: torch.Tensor) -> None:
        """Adaptive threshold adjustment: move the threshold toward this batch's calibration."""
        m = self.ata_momentum
        target = _threshold_from_percentile(x, self.top_level)
        log_t = self._log_threshold()
        V = (1 - m) * log_t.float().exp() + m * target
        # through .data: an earlier forward's graph (gradient accumulation) still holds log_t for
        # the clamp's backward; it only reads the ±30 mask, which a momentum step cannot flip
        # in practice, while a version bump would make that backward fail
        log_t.data.copy_(V.log().to(log_t.dtype))

    def _mix(self, y_spiking: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lam = self.sgc_lambda
        if lam == 0:
            return y_spiking  # the plain neuron, untouched: bit-identical
        return (1.0 - lam) * y_spiking + lam * x

    def _record(self, abs_counts: torch.Tensor, nonzero: torch.Tensor, steps: int) -> None:
        for stats, name in self._spike_recorders:
            stats._add(name, self, abs_counts, nonzero, steps)

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.channels:
            raise ValueError(f"{self.kind} neuron expects {self.channels} channels, got x {tuple(x.shape)}")

    def _pre_forward(self, x: torch.Tensor) -> None:
        self._check_channels(x)
        # ATA runs before the threshold enters this forward's graph (no in-place edit of a
        # saved tensor); it is not for use with gradient checkpointing (recompute would differ)
        if self.ata_momentum > 0 and self.training:
            self._ata_update(x)


class SILIF(_SpikingNeuron):
    """Signed-integer LIF neuron (SpikingMamba): ``s ∈ {-D..D}``, ``y = s·V``.

    Args:
        channels: C, the size of the last dim of x; one threshold V per channel.
        D: spike levels per sign (D = 1 is ternary). More levels: closer to the dense model,
            more spikes (energy).
        learnable: train V (LSQ gradient). False freezes V after calibration.
        ata_momentum: > 0 re-calibrates V while training, ``V <- (1-m)·V + m·p99.9/D``.
        lsq_grad_scale: multiply V's gradient by ``1/sqrt(n·D)`` (LSQ).
    """

    kind = "si_lif"

    def __init__(
        self,
        channels: int,
        D: int = DEFAULT_D,
        learnable: bool = True,
        ata_momentum: float = 0.0,
        lsq_grad_scale: bool = True,
    ):
        super().__init__(channels, learnable, ata_momentum, lsq_grad_scale)
        self.D = _check_int_at_least_one(D, "D")
        self.top_level = self.D
        self.log_V = nn.Parameter(torch.zeros(channels), requires_grad=learnable)

    def _log_threshold(self) -> nn.Parameter:
        return self.log_V

    @property
    def V(self) -> torch.Tensor:
        """Per-channel threshold (step) ``[C]``, always > 0."""
        return self.threshold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., C] -> y [..., C]``, closed form (one pass)."""
        self._pre_forward(x)
        y, s = si_lif(x, self.threshold_for(x), self.D)
        if self._spike_recorders:
            self._record(s.abs(), s != 0, steps=1)
        return self._mix(y, x)

    @torch.no_grad()
    def spike_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Signed integer spike counts ``[..., C]`` (int32) of the closed form."""
        return _si_lif_counts(x / self.threshold(), self.D).to(torch.int32)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Micro-step form ``x [..., C] -> y [..., C]``; equals ``forward`` when sgc_lambda == 0.

        Always the deployed (pure spiking) neuron: SGC is training-only and is not applied.
        Differentiable through the D micro-steps (surrogate gradients).
        """
        y, _ = si_lif_simulate(x, self.threshold_for(x), self.D)
        return y

    def simulate_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-micro-step output events ``[D, ..., C]`` (``±V`` or 0), differentiable.

        What a spike-driven next layer consumes event by event; summing over the steps gives
        ``simulate(x)`` up to float rounding of the sum.
        """
        V = self.threshold_for(x)
        u = x / V
        v = u.abs() + 0.5
        sign = torch.sign(u).detach()
        events = []
        for _ in range(self.D):
            b = _Heaviside.apply(v)
            v = v - b
            events.append(sign * b * V)
        return torch.stack(events).to(x.dtype)

    @torch.no_grad()
    def simulate_spike_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Signed spike counts ``[..., C]`` (int32) from the micro-step form."""
        _, s = si_lif_simulate(x, self.threshold(), self.D)
        return s.to(torch.int32)

    def extra_repr(self) -> str:
        return f"{self.channels}, D={self.D}, learnable={self.log_V.requires_grad}"


class ATMN(_SpikingNeuron):
    """Adaptive Ternary Multi-step Neuron (MAR): T ternary steps, ``V_th = exp(a)``.

    Args:
        channels: C; one ``a`` per channel.
        T: steps per token. More steps: finer output, more spikes.
        tau: leak between steps (1 = none; > 1 makes later steps weaker).
        learnable: train ``a`` through the surrogate gradient.
        ata_momentum: > 0 re-calibrates V_th while training.
        lsq_grad_scale: multiply V_th's gradient by ``1/sqrt(n·T)``.
    """

    kind = "atmn"

    def __init__(
        self,
        channels: int,
        T: int = DEFAULT_T,
        tau: float = 1.0,
        learnable: bool = True,
        ata_momentum: float = 0.0,
        lsq_grad_scale: bool = True,
    ):
        super().__init__(channels, learnable, ata_momentum, lsq_grad_scale)
        self.T = _check_int_at_least_one(T, "T")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)
        self.top_level = self.T
        self.a = nn.Parameter(torch.zeros(channels), requires_grad=learnable)
        # SBDS (methods.md §6): forward uses only the first k steps when set (None = all T);
        # a run-time switch, not saved: a reloaded neuron always runs all T steps
        self.active_steps: int | None = None

    def _log_threshold(self) -> nn.Parameter:
        return self.a

    def levels(self) -> int:
        """Steps the forward runs: T, or the first ``active_steps`` of them (SBDS's q_t)."""
        if self.active_steps is None:
            return self.T
        return min(_check_int_at_least_one(self.active_steps, "active_steps"), self.T)

    @property
    def V_th(self) -> torch.Tensor:
        """Per-channel threshold ``exp(a)`` ``[C]``."""
        return self.threshold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., C] -> y = Σ_t s_t·V_th [..., C]``.

        tau == 1: closed form (one pass). tau != 1: the T-step loop, which *is* the closed form
        there (the leak makes the count depend on the whole spike history); T is small.
        With ``active_steps = k`` only the first k steps run: ``y = Σ_{t<k} s_t·V_th``, the
        entry k-1 of ``step_outputs`` (the first k steps of a T-step train do not depend on T).
        """
        self._pre_forward(x)
        V_th = self.threshold_for(x)
        steps = self.levels()
        if self.tau == 1.0:
            y, c = atmn_closed_form(x, V_th, steps)
            if self._spike_recorders:
                # no leak: the train has |c| spikes, all of one sign, so nonzero steps == |c|
                abs_c = c.abs()
                self._record(abs_c, abs_c, steps=steps)
        else:
            partial_y, spikes = atmn_steps(x, V_th, steps, self.tau)
            y = partial_y[-1]
            if self._spike_recorders:
                abs_s = spikes.abs()
                self._record(abs_s.sum(0), abs_s.sum(0), steps=steps)
        return self._mix(y, x)

    def step_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, ..., C]``: entry t is the output using only the first t+1 steps (for SBDS).

        The last entry equals ``forward(x)``; SGC mixing is applied to every entry. No ATA
        update and no spike counting here (``forward`` does both).
        """
        self._check_channels(x)
        V_th = self.threshold_for(x)
        if self.tau == 1.0:
            partial = torch.stack([atmn_closed_form(x, V_th, t + 1)[0] for t in range(self.T)])
        else:
            partial, _ = atmn_steps(x, V_th, self.T, self.tau)
        lam = self.sgc_lambda
        if lam == 0:
            return partial
        return (1.0 - lam) * partial + lam * x

    @torch.no_grad()
    def spike_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Ternary spike train ``[T, ..., C]`` (int32 in {-1, 0, 1})."""
        V_th = self.threshold()
        if self.tau == 1.0:
            c = torch.trunc(x / V_th).clamp(-self.T, self.T)
            steps = torch.arange(self.T, device=x.device).view(-1, *([1] * x.dim()))
            fired = (c.abs().unsqueeze(0) > steps).to(c.dtype)  # step t fires while t < |c|
            return (torch.sign(c).unsqueeze(0) * fired).to(torch.int32)
        _, spikes = atmn_steps(x, V_th, self.T, self.tau)
        return spikes.to(torch.int32)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The T-step loop ``x [..., C] -> y [..., C]``; equals ``forward`` when sgc_lambda == 0."""
        partial_y, _ = atmn_steps(x, self.threshold_for(x), self.T, self.tau)
        return partial_y[-1]

    def simulate_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step output events ``[T, ..., C]`` (``s_t·V_th``), differentiable."""
        partial_y, _ = atmn_steps(x, self.threshold_for(x), self.T, self.tau)
        return torch.cat([partial_y[:1], partial_y[1:] - partial_y[:-1]])

    @torch.no_grad()
    def simulate_spike_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Ternary spike train ``[T, ..., C]`` (int32) from the step loop."""
        _, spikes = atmn_steps(x, self.threshold(), self.T, self.tau)
        return spikes.to(torch.int32)

    def extra_repr(self) -> str:
        return f"{self.channels}, T={self.T}, tau={self.tau}, learnable={self.a.requires_grad}"


NEURON_KINDS: dict[str, type[_SpikingNeuron]] = {"si_lif": SILIF, "atmn": ATMN}
_KIND_FIELDS = {"si_lif": ("D",), "atmn": ("T", "tau")}  # the fields that apply to one kind only


class NeuronSpec(BaseModel):
    """One neuron: its kind and settings. The typed form of ``config.neurons[placement]``.

    Recipes build it (``stages.distill.neuron``, ``stages.sparsify.modules``); the model config
    stores ``spec.to_config()`` (a plain dict, JSON in config.json) and ``make_neuron`` reads it
    back through this class, so every default lives here. A field of the other kind (``D`` for
    atmn, ``T`` / ``tau`` for si_lif) is refused unless it is None (a dumped spec has them as None).

    >>> NeuronSpec(kind="atmn").to_config()
    {'kind': 'atmn', 'T': 4, 'tau': 1.0, 'learnable': True, 'lsq_grad_scale': True, 'ata_momentum': 0.0}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["si_lif", "atmn"] = Field("si_lif", description="si_lif: signed integer spikes; atmn: ternary multi-step")
    D: StrictInt | None = Field(None, ge=1, description=f"si_lif levels per sign (None: {DEFAULT_D}): more = closer to dense, more spikes")
    T: StrictInt | None = Field(None, ge=1, description=f"atmn steps per token (None: {DEFAULT_T}): more = finer output, more spikes")
    tau: StrictFloat | StrictInt | None = Field(None, gt=0, allow_inf_nan=False, description="atmn leak between steps (None: 1 = none; > 1 weakens later steps)")
    learnable: StrictBool = Field(True, description="train the threshold (LSQ / exp(a) gradient); false keeps the calibrated one")
    lsq_grad_scale: StrictBool = Field(True, description="LSQ's 1/sqrt(n·levels) threshold-gradient scale; false: thresholds move faster")
    ata_momentum: StrictFloat | StrictInt = Field(0.0, ge=0, lt=1, description="> 0: re-calibrate the threshold while training (SNN2ANN's ATA)")

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data):
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        kind = data.get("kind", "si_lif")
        for other, fields in _KIND_FIELDS.items():
            for name in fields:
                if other != kind and data.get(name) is not None:
                    raise ValueError(f"{name!r} does not apply to kind {kind!r} (its fields: {list(_KIND_FIELDS.get(kind, ()))})")
        if kind == "si_lif":
            data["D"] = DEFAULT_D if data.get("D") is None else data["D"]
        elif kind == "atmn":
            data["T"] = DEFAULT_T if data.get("T") is None else data["T"]
            data["tau"] = 1.0 if data.get("tau") is None else data["tau"]
        return data

    @classmethod
    def of(cls, spec: "NeuronSpec | Mapping") -> "NeuronSpec":
        """A spec from a config dict (``{"kind": "si_lif", "D": 4}``) or a spec; ValueError naming the field."""
        if isinstance(spec, NeuronSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"neuron spec must be a dict, got {type(spec).__name__}")
        if "kind" not in spec:
            raise ValueError(f"neuron spec has no 'kind' (one of {sorted(NEURON_KINDS)}): {dict(spec)}")
        if spec["kind"] not in NEURON_KINDS:
            raise ValueError(f"neuron spec kind {spec['kind']!r} unknown; expected one of {sorted(NEURON_KINDS)}")
        try:
            return cls.model_validate(dict(spec))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                allowed = ["kind", *_KIND_FIELDS[spec["kind"]], "learnable", "lsq_grad_scale", "ata_momentum"]
                message = f"neuron spec key {where!r} unknown for kind {spec['kind']!r}; allowed: {allowed}"
            elif where:
                message = f"neuron spec {where!r}: {message}"
            raise ValueError(message) from None

    @property
    def levels(self) -> int:
        """The top spike level: D (SI-LIF) or T (ATMN)."""
        return self.D if self.kind == "si_lif" else self.T

    def signature(self) -> tuple:
        """What a calibrated threshold depends on: the kind, its levels and its leak."""
        return (self.kind, self.D) if self.kind == "si_lif" else (self.kind, self.T, self.tau)

    def to_config(self) -> dict:
        """The plain dict stored in ``config.neurons`` (only this kind's fields)."""
        other = {name for kind, fields in _KIND_FIELDS.items() if kind != self.kind for name in fields}
        return {k: v for k, v in self.model_dump().items() if k not in other}

    def describe(self) -> str:
        """``si_lif D=4`` / ``atmn T=4 tau=1.0`` (+ ``frozen`` when the threshold does not learn)."""
        fields = " ".join(f"{name}={getattr(self, name)}" for name in _KIND_FIELDS[self.kind])
        return f"{self.kind} {fields}" + ("" if self.learnable else " frozen")


def make_neuron(spec: NeuronSpec | Mapping, channels: int) -> nn.Module:
    """Build a neuron from a spec: ``make_neuron({"kind": "si_lif", "D": 4}, channels=64)``.

    Unknown kind, unknown key or a bad value -> ``ValueError`` naming the field.
    """
    spec = NeuronSpec.of(spec)
    kwargs = {k: v for k, v in spec.to_config().items() if k != "kind"}
    return NEURON_KINDS[spec.kind](channels, **kwargs)


@torch.no_grad()
def inherit_threshold(neuron: _SpikingNeuron, previous: _SpikingNeuron) -> None:
    """Start ``neuron`` from ``previous``'s trained per-channel threshold, keeping the top level
    (methods.md §5): ``V_new = V_prev · top_prev / top_new``, so both clip at the same ``|x|``.

    SI-LIF(D, V) -> ATMN(T, V_th = V·D/T): the new neuron covers the range the old one was trained
    to, instead of a fresh percentile guess. Marks ``neuron`` calibrated.
    """
    neuron.set_threshold_(previous.threshold().float() * previous.top_level / neuron.top_level)


# ---------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------


def iter_neurons(model: nn.Module) -> Iterator[tuple[str, _SpikingNeuron]]:
    """``(name, neuron)`` for every SILIF / ATMN submodule of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _SpikingNeuron):
            yield name, module


# Placement -> the neuron's key in its block's `neurons` ModuleDict (mixer for in_proj / x_proj /
# out_proj, mlp for mlp.*). No key ends in a linear layer's name, so PEFT's standard
# `target_modules=["in_proj", "x_proj", "dt_proj"]` (matched by name suffix) adapts the projections
# and never a neuron. Folders saved before this naming held `neurons.in_proj`, `neurons.up`, ...
NEURON_MODULE_NAMES: dict[str, str] = {
    "in_proj": "in_proj_input",
    "x_proj": "x_proj_input",
    "dt_proj": "dt_proj_input",
    "out_proj": "out_proj_input",
    "mlp.up": "up_input",
    "mlp.down": "down_input",
    "head": "head_input",  # the LM head's input: backbone.neurons.head_input, after norm_f
}
_MIXER_NEURON_PLACEMENTS = {NEURON_MODULE_NAMES[p]: p for p in ("in_proj", "x_proj", "dt_proj", "out_proj", "head")}
_MLP_NEURON_PLACEMENTS = {NEURON_MODULE_NAMES[p]: p for p in ("mlp.up", "mlp.down")}
_PLACEMENT_ALIASES = {"mlp_up": "mlp.up", "mlp_down": "mlp.down"}


def neuron_placement(name: str) -> str:
    """Placement of a neuron from its module name.

    ``backbone.layers.3.mixer.neurons.in_proj_input`` -> ``in_proj``; MLP neurons
    (``...layers.3.mlp.neurons.up_input``) -> ``mlp.up`` / ``mlp.down``. The names of hand-built
    modules (``...mixer.neurons.in_proj``, ``...mlp.neurons.up``, ``...neurons.mlp_down``) map
    too. Anything else -> the last name component.
    """
    parts = name.split(".")
    last = parts[-1]
    if "mlp" in parts[:-1] and last in _MLP_NEURON_PLACEMENTS:
        return _MLP_NEURON_PLACEMENTS[last]
    if last in _MIXER_NEURON_PLACEMENTS:
        return _MIXER_NEURON_PLACEMENTS[last]
    if last in _PLACEMENT_ALIASES:
        return _PLACEMENT_ALIASES[last]
    if "mlp" in parts[:-1] and last in ("up", "down"):
        return f"mlp.{last}"
    return last


def layer_index(name: str) -> int | None:
    """Block index from a module name (``...layers.3....`` -> 3), None outside the blocks."""
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def set_sgc_lambda(model: nn.Module, lam: float) -> int:
    """Set ``sgc_lambda`` on every neuron in ``model``; returns how many neurons were set."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"sgc_lambda must be a float in [0, 1], got {lam!r}")
    n = 0
    for _, neuron in iter_neurons(model):
        neuron.sgc_lambda = float(lam)
        n += 1
    return n


@dataclass
class _Totals:
    kind: str
    placement: str
    layer: int | None
    steps: int  # 1 for SI-LIF, T for ATMN (elements include the step axis)
    abs_sum: torch.Tensor | int = 0  # Σ|s|, int64 tensor on the model's device until read
    nonzero: torch.Tensor | int = 0  # number of (step, token, channel) with s != 0
    active: torch.Tensor | int = 0  # number of (token, channel) with any spike in the token
    elements: int = 0  # tokens · channels · steps
    tokens: int = 0
    channels: int = 0


@dataclass
class SpikeStats:
    """Spike totals collected by ``count_spikes``.

    Per neuron (module name): Σ|s|, nonzero count, elements, tokens. For ATMN an element is one
    (step, token, channel), so its firing rate is spikes per neuron per step. Derived figures:
    ``firing_rate = nonzero / elements``, ``mean_abs = Σ|s| / elements``,
    ``spikes_per_token = Σ|s| / tokens``, per name, per placement and overall.

    ``attention_mask [B, L]`` (settable between batches) restricts counting to real tokens;
    without it padding tokens are counted too.
    """

    attention_mask: torch.Tensor | None = None
    _totals: dict[str, _Totals] = field(default_factory=dict)

    def _add(self, name: str, neuron: _SpikingNeuron, abs_counts, nonzero, steps: int) -> None:
        """Accumulate one forward's ``|s|`` / nonzero-step counts per token ``[..., C]``."""
        rec = self._totals.get(name)
        if rec is None:
            rec = self._totals[name] = _Totals(neuron.kind, neuron_placement(name), layer_index(name), steps)
        mask = self.attention_mask
        channels = abs_counts.shape[-1]
        active = abs_counts > 0  # [..., C]: the channel sends at least one spike event in the token
        if mask is None:
            tokens = abs_counts.numel() // channels
            abs_sum = abs_counts.sum(dtype=torch.int64)
            nz = nonzero.sum(dtype=torch.int64)
            act = active.sum(dtype=torch.int64)
        else:
            if tuple(mask.shape) != tuple(abs_counts.shape[:-1]):
                raise ValueError(
                    f"attention_mask shape {tuple(mask.shape)} does not match the tokens of neuron "
                    f"{name!r} (input {tuple(abs_counts.shape)})"
                )
            m = mask.to(device=abs_counts.device).bool().unsqueeze(-1)
            tokens = int(m.sum())
            abs_sum = (abs_counts * m).sum(dtype=torch.int64)
            nz = (nonzero * m).sum(dtype=torch.int64)
            act = (active & m).sum(dtype=torch.int64)
        rec.abs_sum = rec.abs_sum + abs_sum
        rec.nonzero = rec.nonzero + nz
        rec.active = rec.active + act
        rec.tokens += tokens
        rec.channels = channels
        rec.elements += tokens * channels * steps

    # --- per name -----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._totals)

    def spike_totals(self) -> dict[str, tuple[int, int]]:
        """Per neuron name: ``(Σ|s| over all counted tokens (and steps), number of tokens)``."""
        return {n: (int(r.abs_sum), r.tokens) for n, r in self._totals.items()}

    def by_name(self) -> dict[str, dict]:
        return {n: self._summary([r]) | {"placement": r.placement, "layer": r.layer, "kind": r.kind}
                for n, r in self._totals.items()}

    def by_placement(self) -> dict[str, dict]:
        groups: dict[str, list[_Totals]] = {}
        for r in self._totals.values():
            groups.setdefault(r.placement, []).append(r)
        return {p: self._summary(rs) for p, rs in groups.items()}

    @staticmethod
    def _summary(records: list[_Totals]) -> dict:
        abs_sum = sum(int(r.abs_sum) for r in records)
        nonzero = sum(int(r.nonzero) for r in records)
        active = sum(int(r.active) for r in records)
        elements = sum(r.elements for r in records)
        token_channels = sum(r.tokens * r.channels for r in records)
        # every neuron of a model sees each token once: tokens of the group = max, not the sum
        tokens = max((r.tokens for r in records), default=0)
        return {
            "abs_sum": abs_sum,
            "nonzero": nonzero,
            "active": active,
            "elements": elements,
            "tokens": tokens,
            "firing_rate": nonzero / elements if elements else 0.0,
            "mean_abs": abs_sum / elements if elements else 0.0,
            "spikes_per_token": abs_sum / tokens if tokens else 0.0,
            # fraction of (token, channel) pairs with at least one spike: the weight rows a token needs
            "active_fraction": active / token_channels if token_channels else 0.0,
        }

    # --- overall ------------------------------------------------------------------------
    def overall(self) -> dict:
        return self._summary(list(self._totals.values()))

    @property
    def firing_rate(self) -> float:
        return self.overall()["firing_rate"]

    @property
    def mean_abs(self) -> float:
        return self.overall()["mean_abs"]

    @property
    def spikes_per_token(self) -> float:
        """Σ|s| over every neuron of the model, per token."""
        return self.overall()["spikes_per_token"]

    def to_dict(self) -> dict:
        return {"overall": self.overall(), "by_placement": self.by_placement(), "by_name": self.by_name()}


@contextmanager
def count_spikes(model: nn.Module, attention_mask: torch.Tensor | None = None) -> Iterator[SpikeStats]:
    """Count the spikes of every neuron in ``model`` during the forwards run inside the block.

    ``with count_spikes(model, attention_mask=batch["attention_mask"]) as stats: model(**batch)``.
    Counts come from the integer spikes of the actual forward (per element ``|s|``). Nothing is
    counted outside the block. Under gradient checkpointing a recomputed forward counts twice:
    count in eval / no-grad runs.
    """
    stats = SpikeStats(attention_mask=attention_mask)
    neurons = [(name, n) for name, n in iter_neurons(model)]
    for name, neuron in neurons:
        neuron._spike_recorders.append((stats, name))
    try:
        yield stats
    finally:
        for _, neuron in neurons:
            neuron._spike_recorders[:] = [(s, n) for s, n in neuron._spike_recorders if s is not stats]
