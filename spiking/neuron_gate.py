"""The mixer's tail: gate y·SiLU(z), then the spiking neuron on out_proj's input; ref + dispatch.

    x = (y · SiLU(z)).to(dtype).transpose(1, 2)      y, z: [B, D, L] -> x [B, L, D]
    out = (1 - λ)·neuron(x; V, levels) + λ·x         neuron: SI-LIF or ATMN (tau = 1), closed form

`gate_neuron_ref` is exactly what the model's reference path computes (the scan's gate, then the
neuron module's closed form from `spiking/neurons.py`, then SGC mixing), written as one function
of tensors; `gate_neuron(..., backend="triton")` runs the fused kernel of `triton_neurons.py`.
The neuron module's extras stay outside: the model passes `V = neuron.threshold_for(x)` (so
the LSQ gradient scale and the log-threshold apply through autograd) and falls back to the
unfused path for what the kernel does not do (spike counting, ATA updates, ATMN with tau != 1).

Tests: `OMP_NUM_THREADS=1 python -m pytest tests/test_kernels.py -q`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .neurons import atmn_closed_form, si_lif
from .scan import resolve_backend

GATE_NEURON_KINDS = ("si_lif", "atmn")


def _check(kind: str, levels: int) -> None:
    if kind not in GATE_NEURON_KINDS:
        raise ValueError(f"gate_neuron: kind must be one of {GATE_NEURON_KINDS}, got {kind!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"gate_neuron: levels must be an integer >= 1, got {levels!r}")


def gate_neuron_ref(
    y: torch.Tensor,
    z: torch.Tensor | None,
    V: torch.Tensor,
    kind: str,
    levels: int,
    sgc_lambda: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y, z: [B, D, L] (z None: no gate); V: [D] > 0; levels: SI-LIF's D or ATMN's T. -> [B, L, D].

    The gated value is computed in fp32 and rounded to `out_dtype` (default y's), as the scan
    does before the neuron sees it; the neuron's output is in that dtype too.
    """
    _check(kind, levels)
    out_dtype = out_dtype or y.dtype
    x = y.float() if z is None else y.float() * F.silu(z.float())
    x = x.to(out_dtype).transpose(1, 2)  # [B, L, D]
    neuron = si_lif if kind == "si_lif" else atmn_closed_form
    q, _ = neuron(x, V, levels)
    if sgc_lambda == 0:
        return q
    return (1.0 - sgc_lambda) * q + sgc_lambda * x


def gate_neuron(y, z, V, kind, levels, sgc_lambda=0.0, out_dtype=None, backend: str = "auto"):
    """Dispatch: the fused Triton kernel when `backend` resolves to "triton", else the reference.

    mamba-ssm has no such kernel, so "mamba_ssm" runs the reference here.
    """
    _check(kind, levels)
    if resolve_backend(backend, y.device) == "triton":
        from .triton_neurons import gate_neuron_triton  # lazy: importing defines kernels

        return gate_neuron_triton(y, z, V, kind, levels, sgc_lambda, out_dtype)
    return gate_neuron_ref(y, z, V, kind, levels, sgc_lambda, out_dtype)
