"""Triton kernel: gate y·SiLU(z) fused with the spiking neuron on out_proj's input (fwd + bwd).

What it replaces (the mixer's tail, `gate_neuron_ref` in `neuron_gate.py`):

    x = (y · SiLU(z)).to(dtype).transpose(1, 2)          y, z: [B, D, L] -> x: [B, L, D]
    q = s · V,  s = SI-LIF: sign(x/V)·min(floor(|x/V| + 0.5), levels)
                    ATMN (tau = 1): clamp(trunc(x/V), -levels, levels)
    out = (1 - λ)·q + λ·x                                  (SGC; λ = 0 -> out = q)

One read of y and z, one write of out [B, L, D] (ready for out_proj, transpose included); the
unfused sequence makes ~10 elementwise passes. Backward: one read of y, z, dout, one write of
dy, dz, and dV [D] accumulated with atomic adds. Gradients are the neurons' own
(`spiking/neurons.py`): straight-through for x inside the range (SI-LIF |x/V| <= levels, ATMN
0.5 <= |x/V| <= levels + 0.5), LSQ for V (s - x/V inside, s outside), times (1 - λ), plus λ for x.

Import lazily (it defines kernels at import): `TRITON_INTERPRET=1` first on a machine without a GPU.
"""

from __future__ import annotations

import torch

# Guarded so that transformers' remote-code check (`check_imports`, which skips imports inside a
# try) lets a saved model folder carrying this file load where triton is not installed; the
# dispatch in scan.py imports this module only when triton is there.
try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError(f"{__name__} needs triton: pip install triton==3.9.0 ({error})") from error

KIND_IDS = {"si_lif": 0, "atmn": 1}


@triton.jit
def _counts_and_mask(u, LEVELS, KIND: tl.constexpr):
    """Signed spike counts s and the surrogate's in-range mask for u = x / V."""
    a = tl.abs(u)
    sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    if KIND == 0:  # SI-LIF: round half away from zero, clipped at ±levels
        s = sign * tl.minimum(tl.floor(a + 0.5), LEVELS)
        inside = a <= LEVELS
    else:  # ATMN, tau = 1: truncate toward zero, clipped at ±levels
        s = sign * tl.minimum(tl.floor(a), LEVELS)
        inside = (a >= 0.5) & (a <= LEVELS + 0.5)
    return s, inside


@triton.jit
def _gate_neuron_fwd_kernel(
    y_ptr, z_ptr, V_ptr, out_ptr,
    dim, length, LEVELS, sgc_lambda,
    HAS_Z: tl.constexpr, KIND: tl.constexpr, HAS_SGC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """y, z: [B, D, L] -> out: [B, L, D] (out's dtype is the model's: x is rounded to it first)."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (d < dim)[:, None] & (t < length)[None, :]
    in_offsets = (pid_b * dim + d[:, None]) * length + t[None, :]  # [BD, BL] into [B, D, L]
    out_offsets = (pid_b * length + t[None, :]) * dim + d[:, None]  # same elements in [B, L, D]
    x = tl.load(y_ptr + in_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + in_offsets, mask=mask, other=0.0).to(tl.float32)
        x = x * (z * tl.sigmoid(z))
    x = x.to(out_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds the gated value to the model dtype
    V = tl.load(V_ptr + d, mask=d < dim, other=1.0).to(tl.float32)[:, None]
    s, _ = _counts_and_mask(tl.math.div_rn(x, V), LEVELS, KIND)  # IEEE division: same ties as torch
    q = (s * V).to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_SGC:
        q = (1.0 - sgc_lambda) * q + sgc_lambda * x
    tl.store(out_ptr + out_offsets, q, mask=mask)


@triton.jit
def _gate_neuron_bwd_kernel(
    y_ptr, z_ptr, V_ptr, dout_ptr, dy_ptr, dz_ptr, dV_ptr,
    dim, length, LEVELS, sgc_lambda,
    HAS_Z: tl.constexpr, KIND: tl.constexpr, NEEDS_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dout: [B, L, D] -> dy, dz: [B, D, L]; dV: [D] (fp32, accumulated)."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    d_mask = d < dim
    mask = d_mask[:, None] & (t < length)[None, :]
    in_offsets = (pid_b * dim + d[:, None]) * length + t[None, :]
    out_offsets = (pid_b * length + t[None, :]) * dim + d[:, None]
    y = tl.load(y_ptr + in_offsets, mask=mask, other=0.0).to(tl.float32)
    x = y
    if HAS_Z:
        z = tl.load(z_ptr + in_offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        x = y * (z * sig)
    x = x.to(dout_ptr.dtype.element_ty).to(tl.float32)
    V = tl.load(V_ptr + d, mask=d_mask, other=1.0).to(tl.float32)[:, None]
    u = tl.math.div_rn(x, V)
    s, inside = _counts_and_mask(u, LEVELS, KIND)
    g = tl.load(dout_ptr + out_offsets, mask=mask, other=0.0).to(tl.float32)
    g_spike = (1.0 - sgc_lambda) * g  # SGC: the neuron's share of the gradient
    dx = tl.where(inside, g_spike, 0.0) + sgc_lambda * g
    if NEEDS_DV:
        dV = tl.sum(tl.where(mask, g_spike * tl.where(inside, s - u, s), 0.0), axis=1)
        tl.atomic_add(dV_ptr + d, dV, mask=d_mask)
    if HAS_Z:
        tl.store(dy_ptr + in_offsets, dx * (z * sig), mask=mask)
        tl.store(dz_ptr + in_offsets, dx * y * sig * (1.0 + z * (1.0 - sig)), mask=mask)
    else:
        tl.store(dy_ptr + in_offsets, dx, mask=mask)


# Tiles on a GPU: (channels, tokens, warps), from the compiled resource usage (ptxas, sm_80 and
# sm_90; checked by tests/test_triton_compile.py): no spills, <= 128 registers per thread.
#   forward  32 x 64, 4 warps: 95-96 registers (16 elements a thread) -> 5 programs (20 warps) per SM
#   backward 32 x 32, 8 warps: 64-80 registers (4 elements a thread) -> 3 programs (24 warps) per SM;
#            at the forward's tile it took 226-255 registers: it holds y, z, sigmoid(z), x, x/V,
#            the counts and dout per element. 32 channels keep the transposed [B, L, D] access
#            128-byte wide.
GPU_FWD_TILE = (32, 64, 4)
GPU_BWD_TILE = (32, 32, 8)
INTERPRETER_TILE = (8, 16, 4)  # few programs, small tiles: the interpreter runs elements in Python


def _tiles(device: torch.device) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((BLOCK_D, BLOCK_L, warps) forward, the same backward) for `device`."""
    return (GPU_FWD_TILE, GPU_BWD_TILE) if device.type == "cuda" else (INTERPRETER_TILE, INTERPRETER_TILE)


class GateNeuronTriton(torch.autograd.Function):
    """(y, z, V) -> out [B, L, D]; saves only the inputs (x, u, s are recomputed in backward)."""

    @staticmethod
    def forward(ctx, y, z, V, kind, levels, sgc_lambda, out_dtype):
        batch, dim, length = y.shape
        y = y.contiguous()
        z = z.contiguous() if z is not None else None
        V = V.contiguous()
        out = torch.empty(batch, length, dim, device=y.device, dtype=out_dtype)
        (block_d, block_l, warps), _ = _tiles(y.device)
        grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(length, block_l))
        _gate_neuron_fwd_kernel[grid](
            y, z if z is not None else y, V, out, dim, length, float(levels), float(sgc_lambda),
            HAS_Z=z is not None, KIND=KIND_IDS[kind], HAS_SGC=sgc_lambda != 0,
            BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps,
        )
        ctx.save_for_backward(y, z, V)
        ctx.meta = (kind, levels, sgc_lambda)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, V = ctx.saved_tensors
        kind, levels, sgc_lambda = ctx.meta
        batch, dim, length = y.shape
        dout = dout.contiguous()
        dy = torch.empty_like(y)
        dz = torch.empty_like(z) if z is not None else None
        needs_dV = ctx.needs_input_grad[2]
        dV = torch.zeros(dim, device=y.device, dtype=torch.float32) if needs_dV else None
        _, (block_d, block_l, warps) = _tiles(y.device)
        grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(length, block_l))
        _gate_neuron_bwd_kernel[grid](
            y, z if z is not None else y, V, dout, dy, dz if dz is not None else dy, dV if needs_dV else dy,
            dim, length, float(levels), float(sgc_lambda),
            HAS_Z=z is not None, KIND=KIND_IDS[kind], NEEDS_DV=needs_dV,
            BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps,
        )
        return dy, dz, dV.to(V.dtype) if needs_dV else None, None, None, None, None


def gate_neuron_triton(y, z, V, kind: str, levels: int, sgc_lambda: float = 0.0, out_dtype=None):
    """Fused gate + neuron; arguments as `neuron_gate.gate_neuron_ref`. Returns [B, L, D]."""
    return GateNeuronTriton.apply(y, z, V, kind, levels, sgc_lambda, out_dtype or y.dtype)
