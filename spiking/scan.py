"""Selective scan (Mamba's S6 recurrence): PyTorch reference, fast CPU form and backend dispatch.

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t          h: [B, D, N]
    y_t = C_t · h_t + D · u_t,   out_t = y_t · SiLU(z_t)

`selective_scan_ref` has the signature and semantics of mamba-ssm's `selective_scan_ref`
(`mamba_ssm/ops/selective_scan_interface.py`), computed in fp32 and cast back to `u`'s dtype.
It is the CPU training path of the project, so it is written for speed while staying exact:
the recurrence runs in a custom autograd function over time-major `[L, B, D, N]` buffers, one
fused `addcmul` per step forward and one per step backward (no per-step autograd nodes, no
per-step zero-filled gradient buffers as in an indexing loop), and everything else is batched.

`selective_scan(..., backend=)` picks the implementation explicitly:
  "ref"       this module's PyTorch scan (any device)
  "cpu"       the fused C++ scan of `cpu_kernels.py` (CPU tensors): ~20-60x the ref's speed, no
              [L, B, D, N] buffers; built on first use, and when it cannot be built the reason is
              logged and the ref runs
  "mamba_ssm" mamba-ssm's CUDA kernel `selective_scan_fn` (CUDA tensors, mamba-ssm installed)
  "triton"    the project's Triton kernels (`triton_scan.py`): CUDA tensors, or CPU tensors
              through the interpreter when TRITON_INTERPRET=1 was set before import (tests only)
  "auto"      mamba_ssm when it imports and the tensors are on CUDA, else triton on CUDA; on CPU
              "cpu" (or "ref" when the extension cannot be built); never a GPU kernel (nor the
              interpreter) for CPU tensors
The backend chosen is logged once per (requested, chosen) pair. The Triton modules define kernels
when imported, so they are imported here lazily, at the first call that picks them.

Run its tests: `OMP_NUM_THREADS=1 python -m pytest tests/test_scan.py -q`.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# mamba-ssm is an optional GPU extra. A half-installed package (built without CUDA) raises at
# import (selective_scan_cuda missing), so any exception means "absent", not only ImportError.
try:  # pragma: no cover - depends on the machine
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import (
        selective_state_update as _mamba_selective_state_update,
    )

    MAMBA_SSM_AVAILABLE = True
except Exception:  # noqa: BLE001 - see above
    _mamba_selective_scan_fn = None
    _mamba_selective_state_update = None
    MAMBA_SSM_AVAILABLE = False

# triton is an optional extra too; only its presence is checked here (importing our kernels is lazy)
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

SCAN_BACKENDS = ("auto", "ref", "cpu", "triton", "mamba_ssm")
_TRITON_INSTALL = "pip install 'spikerl[triton]'  (triton==3.9.0)"
_MAMBA_SSM_INSTALL = "pip install --no-build-isolation mamba-ssm causal-conv1d  (on a CUDA machine)"
_logged_choices: set[tuple[str, str]] = set()


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t ⊙ h_{t-1} + b_t over the leading (time) axis; a, b: [L, ...] -> h: [L, ...].

    Backward is the same recurrence run in reverse: g_t = gH_t + a_{t+1} ⊙ g_{t+1};
    ∂b_t = g_t, ∂a_t = g_t ⊙ h_{t-1}; ∂h0 = a_0 ⊙ g_0.
    """

    @staticmethod
    def forward(ctx, a, b, h0):
        states = torch.empty_like(b)
        prev = h0
        for t in range(b.shape[0]):
            if prev is None:
                states[t].copy_(b[t])
            else:
                torch.addcmul(b[t], a[t], prev, out=states[t])
            prev = states[t]
        ctx.save_for_backward(a, states, h0 if h0 is not None else states.new_empty(0))
        ctx.has_h0 = h0 is not None
        return states

    @staticmethod
    def backward(ctx, grad_states):
        a, states, h0 = ctx.saved_tensors
        grad_states = grad_states.contiguous()
        length = states.shape[0]
        grad_b = torch.empty_like(states)
        grad_b[length - 1].copy_(grad_states[length - 1])
        for t in range(length - 2, -1, -1):
            torch.addcmul(grad_states[t], a[t + 1], grad_b[t + 1], out=grad_b[t])
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(a)
            torch.mul(grad_b[1:], states[:-1], out=grad_a[1:])
            if ctx.has_h0:
                torch.mul(grad_b[0], h0, out=grad_a[0])
            else:
                grad_a[0].zero_()
        grad_h0 = a[0] * grad_b[0] if ctx.has_h0 and ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_h0


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of h_t = a_t ⊙ h_{t-1} + b_t (h_{-1} = h0 or 0). a, b: [L, ...]; h0: [...]."""
    return _LinearRecurrence.apply(a.contiguous(), b.contiguous(), h0)


def _expand_groups(M: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, G, N, L] -> [B, D, N, L] (each group shared by D // G channels), as mamba-ssm does."""
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Selective scan in PyTorch, mamba-ssm's `selective_scan_ref` semantics.

    u, delta: [B, D, L]; A: [D, N] (real); B, C: [D, N] (input-independent), [B, N, L]
    (input-dependent, what Mamba uses) or [B, G, N, L] (grouped); D: [D]; z: [B, D, L];
    delta_bias: [D]. Returns out [B, D, L] in u's dtype, and with `return_last_state` the final
    state [B, D, N] (fp32). `initial_state` [B, D, N] (an extension: mamba-ssm starts from 0)
    continues a scan from a cached state.
    """
    if A.is_complex():
        raise ValueError("selective_scan_ref: complex A is not supported (Mamba uses a real A)")
    dtype_in = u.dtype
    batch, dim, length = u.shape
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.float()

    # Time-major [L, B, D, N] so each step of the recurrence reads contiguous memory.
    delta_t = delta.permute(2, 0, 1)  # [L, B, D]
    deltaA = torch.exp(delta_t[..., None] * A)  # [L, B, D, N]
    delta_u = (delta * u).permute(2, 0, 1)[..., None]  # [L, B, D, 1]
    if B.dim() == 2:  # [D, N]
        deltaB_u = delta_u * B.float()
    elif B.dim() == 3:  # [B, N, L] -> [L, B, 1, N]
        deltaB_u = delta_u * B.float().permute(2, 0, 1)[:, :, None, :]
    elif B.dim() == 4:  # [B, G, N, L] -> [L, B, D, N]
        deltaB_u = delta_u * _expand_groups(B.float(), dim).permute(3, 0, 1, 2)
    else:
        raise ValueError(f"selective_scan_ref: B must be [D, N], [B, N, L] or [B, G, N, L], got {tuple(B.shape)}")
    h0 = initial_state.float() if initial_state is not None else None
    states = linear_recurrence(deltaA, deltaB_u, h0)  # [L, B, D, N]

    if C.dim() == 2:  # [D, N]
        y = torch.einsum("lbdn,dn->bdl", states, C.float())
    elif C.dim() == 3:  # [B, N, L]
        y = torch.einsum("lbdn,bnl->bdl", states, C.float())
    elif C.dim() == 4:  # [B, G, N, L]
        y = torch.einsum("lbdn,bdnl->bdl", states, _expand_groups(C.float(), dim))
    else:
        raise ValueError(f"selective_scan_ref: C must be [D, N], [B, N, L] or [B, G, N, L], got {tuple(C.shape)}")
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    if return_last_state:
        return out, states[length - 1]
    return out


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One token of the scan; updates `state` in place (mamba-ssm's `selective_state_update_ref`).

    state: [B, D, N]; x, dt, z: [B, D]; A: [D, N]; B, C: [B, N]; D, dt_bias: [D]. Returns out [B, D].
    """
    dtype_in = x.dtype
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    deltaA = torch.exp(dt[..., None] * A.float())  # [B, D, N]
    deltaB_x = dt[..., None] * B.float()[:, None, :] * x.float()[..., None]  # [B, D, N]
    new_state = state.float() * deltaA + deltaB_x
    state.copy_(new_state.to(state.dtype))
    out = torch.einsum("bdn,bn->bd", new_state, C.float())
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)


def _log_choice(requested: str, chosen: str) -> None:
    if (requested, chosen) not in _logged_choices:
        _logged_choices.add((requested, chosen))
        logger.info("selective scan backend: %s (requested %r)", chosen, requested)


def _cpu_or_ref(requested: str) -> str:
    """"cpu" when the C++ extension loads (built on first use), else "ref", the reason logged once."""
    from .cpu_kernels import load_extension  # lazy: the first call may compile it (~10 s, once per machine)

    error = load_extension()
    if error is None:
        return "cpu"
    if (requested, "ref") not in _logged_choices:
        logger.warning("selective scan backend 'cpu' unavailable, running 'ref' instead: %s", error)
    return "ref"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that `selective_scan` runs for `backend` on `device` (errors name what is missing)."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan_backend must be one of {SCAN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and MAMBA_SSM_AVAILABLE:
            chosen = "mamba_ssm"
        elif device.type == "cuda" and TRITON_AVAILABLE:
            chosen = "triton"
        elif device.type == "cpu":
            chosen = _cpu_or_ref(backend)
        else:
            chosen = "ref"
    elif backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"scan_backend='cpu' needs CPU tensors, got device {device.type!r}; use 'auto' or 'triton'")
        chosen = _cpu_or_ref(backend)
    elif backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError(f"scan_backend='triton' but triton is not installed; install it: {_TRITON_INSTALL}")
        if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError(
                f"scan_backend='triton' needs CUDA tensors, got device {device.type!r}; on CPU use 'ref' (or, for "
                "kernel tests, set TRITON_INTERPRET=1 before importing spiking: ~1000x slower than 'ref')"
            )
        chosen = "triton"
    elif backend == "mamba_ssm":
        if not MAMBA_SSM_AVAILABLE:
            raise RuntimeError(f"scan_backend='mamba_ssm' but mamba_ssm does not import; install it: {_MAMBA_SSM_INSTALL}")
        if device.type != "cuda":
            raise RuntimeError(f"scan_backend='mamba_ssm' needs CUDA tensors, got device {device.type!r}; use 'ref' on CPU")
        chosen = "mamba_ssm"
    else:
        chosen = "ref"
    _log_choice(backend, chosen)
    return chosen


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, backend: str = "auto",
):
    """Dispatch the selective scan to `backend` (see the module docstring); same arguments as the ref."""
    chosen = resolve_backend(backend, u.device)
    if chosen == "cpu":
        if B.dim() == 2 or C.dim() == 2:
            # like the Triton kernel, the C++ one takes input-dependent B, C only (Mamba's)
            _log_choice(backend, "ref (constant B/C)")
        elif A.shape[-1] > 256:
            _log_choice(backend, "ref (state size above the C++ kernel's 256)")
        elif B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
            _log_choice(backend, "ref (B and C of different forms)")
        else:
            from .cpu_kernels import selective_scan_cpu

            return selective_scan_cpu(
                u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                return_last_state=return_last_state, initial_state=initial_state,
            )
    if chosen == "triton":
        if B.dim() != 2 and C.dim() != 2:
            from .triton_scan import selective_scan_triton  # lazy: importing defines kernels

            return selective_scan_triton(
                u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                return_last_state=return_last_state, initial_state=initial_state,
            )
        # the Triton kernel takes input-dependent B, C only; constant [D, N] ones (not Mamba's) run the ref
        _log_choice(backend, "ref (constant B/C)")
    if chosen == "mamba_ssm" and initial_state is None:  # pragma: no cover - needs CUDA + mamba-ssm
        return _mamba_selective_scan_fn(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    # mamba-ssm's kernel has no initial state: a multi-token continuation from a cache uses the ref.
    return selective_scan_ref(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=return_last_state, initial_state=initial_state,
    )


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend="auto"):
    """Dispatch the one-token update: mamba-ssm's, the C++ or the Triton kernel when chosen, else the ref."""
    chosen = resolve_backend(backend, x.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias))
    if chosen == "cpu":
        if not needs_grad and state.is_contiguous() and state.dtype == torch.float32 and A.shape[-1] <= 256:
            from .cpu_kernels import selective_state_update_cpu

            return selective_state_update_cpu(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        # inference-only like the Triton step; a differentiable (or half-precision) step uses the ref
        _log_choice(backend, "ref (one-token step with autograd or a non-fp32 state)")
    if chosen == "triton":
        if not needs_grad and state.is_contiguous():
            from .triton_scan import selective_state_update_triton  # lazy: importing defines kernels

            return selective_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        # the step kernel is inference-only (generation runs under no_grad); a differentiable step uses the ref
        _log_choice(backend, "ref (one-token step with autograd)")
    if chosen == "mamba_ssm":  # pragma: no cover - needs CUDA + mamba-ssm
        return _mamba_selective_state_update(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )
    return selective_state_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
