"""Triton selective scan (forward + backward) and the one-token state-update kernel.

Same semantics and arguments as `scan.selective_scan_ref` / `scan.selective_state_update_ref`
(mamba-ssm's `selective_scan_fn`, plus `initial_state`), fp32 or bf16 inputs, computed in fp32:

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t          h: [B, D, N]
    y_t = C_t · h_t + D · u_t,   out_t = y_t · SiLU(z_t)

Layout of the work: one program per (batch row, block of BLOCK_D channels), all N states in
registers, walking the sequence in chunks of CHUNK tokens (GPU tiles: `GPU_FWD_TILE`,
`GPU_BWD_TILE`, chosen so that no kernel spills and each stays at <= 128 registers a thread). Inside a chunk the recurrence is a
`tl.associative_scan` over the chunk axis on [BLOCK_D, N, CHUNK] tiles (pairs (a, b) compose as
(a1·a2, a2·b1 + b2)); the state carried between chunks enters as `h = b_cum + a_cum · h_carry`.
The forward stores only the state at the start of every chunk ([B, D, L/CHUNK, N], fp32), so
memory stays bounded however long the sequence; the backward recomputes each chunk's states
from that boundary state and runs the adjoint recurrence backwards (a reverse associative scan):

    g_t = C_t · dy_t + a_{t+1} ⊙ g_{t+1}          (g_{L-1} also receives d last_state)
    ∂b_t = g_t,   a_t ⊙ h_{t-1} = h_t - b_t  (so ∂Δ and ∂A need no shifted state)

dB, dC (shared by the channels of a group), dA and dD (shared by the batch) are accumulated with
atomic adds into fp32 buffers. B, C are input-dependent ([B, N, L], or grouped [B, G, N, L]);
the constant [D, N] form is left to the reference (the dispatch routes it there, logged).

This module imports triton and defines kernels at import time: import it lazily (the dispatch in
`scan.py` does) and, on a machine without a GPU, only after setting `TRITON_INTERPRET=1`.

Tests: `OMP_NUM_THREADS=1 python -m pytest tests/test_kernels.py -q`.
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

@triton.jit
def _combine(a_left, b_left, a_right, b_right):
    # (a_left, b_left) is the earlier step: h -> a_right·(a_left·h + b_left) + b_right
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20): x above 20 is returned as is
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _load_delta(delta_ptr, offsets, mask, delta_bias, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """Δ after bias and softplus ([BLOCK_D, CHUNK], fp32, 0 where masked) and the pre-softplus value."""
    raw = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        raw = raw + delta_bias[:, None]
    dt = raw
    if DELTA_SOFTPLUS:
        dt = _softplus(raw)
    # Δ = 0 outside the sequence (softplus(bias) is not): those positions must add no gradient
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, z_ptr, delta_bias_ptr, h0_ptr,
    out_ptr, chunk_states_ptr, last_ptr,
    dim, length, n_chunks, dims_per_group, groups,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """u, delta, z, out: [B, D, L]; A: [D, N]; B, C: [B, G, N, L]; chunk_states: [B, D, n_chunks, N]."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < dim
    n_mask = n < STATE
    dn_mask = d_mask[:, None] & n_mask[None, :]
    group = (pid_d * BLOCK_D) // dims_per_group  # BLOCK_D divides dims_per_group when G > 1

    A = tl.load(A_ptr + d[:, None] * STATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)  # [BD, BN]
    delta_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DELTA_BIAS:
        delta_bias = tl.load(delta_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    D_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        D_skip = tl.load(Dskip_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    state_offsets = (pid_b * dim + d[:, None]) * STATE + n[None, :]  # into [B, D, N]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offsets, mask=dn_mask, other=0.0).to(tl.float32)
    row = (pid_b * dim + d[:, None]) * length  # [BD, 1] start of each channel's sequence
    bc_base = (pid_b * groups + group) * STATE * length
    last_col = (tl.arange(0, CHUNK) == CHUNK - 1)[None, None, :]

    for c in range(n_chunks):
        t = c * CHUNK + tl.arange(0, CHUNK)
        t_mask = t < length
        tl.store(chunk_states_ptr + ((pid_b * dim + d[:, None]) * n_chunks + c) * STATE + n[None, :], h, mask=dn_mask)
        offsets = row + t[None, :]  # [BD, CH]
        mask = d_mask[:, None] & t_mask[None, :]
        u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_ptr, offsets, mask, delta_bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        bc_offsets = bc_base + n[:, None] * length + t[None, :]  # [BN, CH]
        bc_mask = n_mask[:, None] & t_mask[None, :]
        Bt = tl.load(B_ptr + bc_offsets, mask=bc_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_offsets, mask=bc_mask, other=0.0).to(tl.float32)

        # positions past the end are the identity step (a = 1, b = 0): the last column is the state
        valid = t_mask[None, None, :]
        dA = tl.where(valid, tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)  # [BD, BN, CH]
        dBu = tl.where(valid, (dt * u)[:, None, :] * Bt[None, :, :], 0.0)
        a_cum, b_cum = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        hs = b_cum + a_cum * h[:, :, None]
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # [BD, CH]
        if HAS_D:
            y += u * D_skip[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(out_ptr + offsets, y, mask=mask)
        h = tl.sum(tl.where(last_col, hs, 0.0), axis=2)
    tl.store(last_ptr + state_offsets, h, mask=dn_mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, z_ptr, delta_bias_ptr, chunk_states_ptr,
    dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dh0_ptr,
    dim, length, n_chunks, dims_per_group, groups,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_H0: tl.constexpr,
    STATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Gradients of the scan; chunks walked last to first, states recomputed from chunk_states."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < dim
    n_mask = n < STATE
    dn_mask = d_mask[:, None] & n_mask[None, :]
    group = (pid_d * BLOCK_D) // dims_per_group

    A = tl.load(A_ptr + d[:, None] * STATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    delta_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DELTA_BIAS:
        delta_bias = tl.load(delta_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    D_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        D_skip = tl.load(Dskip_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    state_offsets = (pid_b * dim + d[:, None]) * STATE + n[None, :]
    g_carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # g at the first token of the next chunk
    if HAS_DLAST:
        g_carry = tl.load(dlast_ptr + state_offsets, mask=dn_mask, other=0.0).to(tl.float32)
    dh_in = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # ∂ of the state before the chunk
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = (pid_b * dim + d[:, None]) * length
    bc_base = (pid_b * groups + group) * STATE * length
    first_col = (tl.arange(0, CHUNK) == 0)[None, None, :]

    for c_rev in range(n_chunks):
        c = n_chunks - 1 - c_rev
        t = c * CHUNK + tl.arange(0, CHUNK)
        t_mask = t < length
        offsets = row + t[None, :]
        mask = d_mask[:, None] & t_mask[None, :]
        u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dt, dt_raw = _load_delta(delta_ptr, offsets, mask, delta_bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        bc_offsets = bc_base + n[:, None] * length + t[None, :]
        bc_mask = n_mask[:, None] & t_mask[None, :]
        Bt = tl.load(B_ptr + bc_offsets, mask=bc_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_offsets, mask=bc_mask, other=0.0).to(tl.float32)

        # recompute this chunk's states from its boundary state
        valid = t_mask[None, None, :]
        dA = tl.where(valid, tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)
        dBu = tl.where(valid, (dt * u)[:, None, :] * Bt[None, :, :], 0.0)
        h_start = tl.load(
            chunk_states_ptr + ((pid_b * dim + d[:, None]) * n_chunks + c) * STATE + n[None, :], mask=dn_mask, other=0.0
        )
        a_cum, b_cum = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        hs = b_cum + a_cum * h_start[:, :, None]  # [BD, BN, CH]
        # Register pressure: every [BD, BN, CH] tile alive at once costs BD·BN·CH / threads registers
        # per thread. So each use of hs comes right here (the output for dz, dC), then hs is folded
        # into a_t ⊙ h_{t-1} = h_t - b_t and dropped, and of dA only the first column is kept,
        # before the reverse scan brings its own three tiles.
        dA_first = tl.sum(tl.where(first_col, dA, 0.0), axis=2)  # [BD, BN]: a at the chunk's first token
        ah = hs - dBu  # a_t ⊙ h_{t-1}

        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = dout
        if HAS_Z:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += u * D_skip[:, None]
            sig = tl.sigmoid(z)
            tl.store(dz_ptr + offsets, dout * y * sig * (1.0 + z * (1.0 - sig)), mask=mask)
            dy = dout * (z * sig)
        du = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
            du = dy * D_skip[:, None]
        # ∂C_t (summed over the group's channels) = Σ_d dy_t · h_t
        tl.atomic_add(dC_ptr + bc_offsets, tl.sum(dy[:, None, :] * hs, axis=0), mask=bc_mask)

        # adjoint recurrence g_t = dy_t·C_t + a_{t+1}·g_{t+1}, run backwards; a_{t+1} read at t+1
        t_next = t + 1
        next_mask = d_mask[:, None] & (t_next < length)[None, :]
        dt_next, _ = _load_delta(delta_ptr, row + t_next[None, :], next_mask, delta_bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        # past the last token the step is the identity, so g_{L-1} = dy_{L-1}·C + d last_state
        alpha = tl.where((t_next < length)[None, None, :], tl.exp(dt_next[:, None, :] * A[:, :, None]), 1.0)
        beta = tl.where(valid, dy[:, None, :] * Ct[None, :, :], 0.0)
        alpha_cum, g_cum = tl.associative_scan((alpha, beta), axis=2, combine_fn=_combine, reverse=True)
        g = g_cum + alpha_cum * g_carry[:, :, None]  # [BD, BN, CH]

        g_ah = g * ah  # g_t ⊙ a_t ⊙ h_{t-1}
        gB = tl.sum(g * Bt[None, :, :], axis=1)  # [BD, CH]
        ddt = tl.sum(g_ah * A[:, :, None], axis=1) + gB * u
        dA_acc += tl.sum(g_ah * dt[:, None, :], axis=2)
        du += gB * dt
        tl.atomic_add(dB_ptr + bc_offsets, tl.sum(g * (dt * u)[:, None, :], axis=0), mask=bc_mask)
        if DELTA_SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        tl.store(ddelta_ptr + offsets, ddt, mask=mask)
        tl.store(du_ptr + offsets, du, mask=mask)
        g_first = tl.sum(tl.where(first_col, g, 0.0), axis=2)
        g_carry = g_first
        dh_in = g_first * dA_first

    tl.atomic_add(dA_ptr + d[:, None] * STATE + n[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, mask=d_mask)
    if HAS_H0:
        tl.store(dh0_ptr + state_offsets, dh_in, mask=dn_mask)


def _block_d(dim: int, groups: int, target: int) -> int:
    """Channels per program: a power of two <= target; inside one group of B/C when G > 1."""
    if groups == 1:
        return min(target, triton.next_power_of_2(dim))
    per_group = dim // groups
    block = 1
    while block * 2 <= target and per_group % (block * 2) == 0:
        block *= 2
    return block


# Tiles on a GPU: (channels per program, tokens per chunk, warps), forward and backward apart.
# Chosen from the compiled resource usage (ptxas, sm_80 and sm_90; tests/test_triton_compile.py
# re-checks them and `python -m spiking.triton_resources` prints the table): no spills and
# <= 128 registers per thread. Registers grow with the [BLOCK_D, N, CHUNK] tile elements each
# thread holds, ~BLOCK_D·N·CHUNK / (32·warps): at 4 that is ~60-80 (forward) / ~100 (backward),
# at 8 ~80-90 / 130-180, at 16 (the old 4 x 64 x 4 warps) 221 / 255 with a 224-byte spill.
#   forward  4 x 32, 8 warps: 77-78 registers -> 3 programs (24 warps) per SM of 64 K registers.
#   backward 4 x 32, 16 warps: 104-106 registers -> 1 program (16 warps) per SM; 4 channels a
#            program (not 2 at 8 warps, also <= 128) halve the atomic adds of dB and dC, which
#            every program of a batch row makes to the same [N, L] rows.
# Both walk the same chunks (the backward restarts from the forward's chunk-boundary states).
GPU_FWD_TILE = (4, 32, 8)
GPU_BWD_TILE = (4, 32, 16)
GPU_STEP_BLOCK_D = 64  # the one-token kernel: channels per program (4 warps)
INTERPRETER_TILE = (4, 16, 4)  # the smallest sensible one: the interpreter runs each element in Python


def _default_tiles(device: torch.device) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((BLOCK_D, CHUNK, warps) forward, the same backward) for `device`."""
    if device.type == "cuda":
        return GPU_FWD_TILE, GPU_BWD_TILE
    return INTERPRETER_TILE, INTERPRETER_TILE


def _as_groups(M: torch.Tensor, name: str) -> torch.Tensor:
    """B or C [B, N, L] or [B, G, N, L] -> contiguous [B, G, N, L]."""
    if M.dim() == 3:
        return M.unsqueeze(1).contiguous()
    if M.dim() == 4:
        return M.contiguous()
    raise ValueError(
        f"selective_scan_triton: {name} must be input-dependent [B, N, L] or [B, G, N, L], got {tuple(M.shape)} "
        "(constant B/C runs on backend='ref')"
    )


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper of the two kernels; saves inputs plus the chunk-boundary states only."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles, chunk):
        (block_d, warps), bwd_tile = tiles
        batch, dim, length = u.shape
        state = A.shape[1]
        B4, C4 = _as_groups(B, "B"), _as_groups(C, "C")
        groups = B4.shape[1]
        if C4.shape[1] != groups or dim % groups:
            raise ValueError(f"selective_scan_triton: B and C need the same group count G dividing D={dim}")
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        A = A.contiguous()
        n_chunks = max(triton.cdiv(length, chunk), 1)
        out = torch.empty_like(u)
        chunk_states = torch.empty(batch, dim, n_chunks, state, device=u.device, dtype=torch.float32)
        last = torch.empty(batch, dim, state, device=u.device, dtype=torch.float32)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        dummy = u  # never read: the constexpr flag switches the load off
        grid = (batch, triton.cdiv(dim, block_d))
        _scan_fwd_kernel[grid](
            u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
            out, chunk_states, last,
            dim, length, n_chunks, dim // groups, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
            DELTA_SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None,
            STATE=state, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(state), CHUNK=chunk, num_warps=warps,
        )
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, chunk_states, h0)
        ctx.meta = (delta_softplus, bwd_tile, chunk, n_chunks, B.dim(), B.dtype, C.dtype,
                    initial_state.dtype if initial_state is not None else None)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B4, C4, D, z, delta_bias, chunk_states, h0 = ctx.saved_tensors
        delta_softplus, (block_d, warps), chunk, n_chunks, bc_dim, B_dtype, C_dtype, h0_dtype = ctx.meta
        batch, dim, length = u.shape
        state = A.shape[1]
        groups = B4.shape[1]
        f32 = dict(device=u.device, dtype=torch.float32)
        dout = dout.contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty(batch, dim, length, **f32)  # fp32: ∂delta_bias sums it
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.zeros(dim, state, **f32)
        dB = torch.zeros(batch, groups, state, length, **f32)
        dC = torch.zeros(batch, groups, state, length, **f32)
        dD = torch.zeros(dim, **f32) if D is not None else None
        dh0 = torch.empty(batch, dim, state, **f32) if h0 is not None else None
        dummy = du
        grid = (batch, triton.cdiv(dim, block_d))
        _scan_bwd_kernel[grid](
            u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, chunk_states,
            dout, dlast.contiguous() if dlast is not None else dummy,
            du, ddelta, dA, dB, dC, dD if dD is not None else dummy, dz if dz is not None else dummy,
            dh0 if dh0 is not None else dummy,
            dim, length, n_chunks, dim // groups, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
            DELTA_SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast is not None, HAS_H0=h0 is not None,
            STATE=state, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(state), CHUNK=chunk, num_warps=warps,
        )
        if bc_dim == 3:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        ddelta_bias = ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        return (
            du, ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B_dtype), dC.to(C_dtype),
            dD.to(D.dtype) if dD is not None else None, dz, ddelta_bias, None,
            dh0.to(h0_dtype) if h0 is not None else None, None, None,
        )


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, block_d: int | None = None, chunk: int | None = None,
):
    """Triton selective scan; arguments as `selective_scan_ref` (plus the tile sizes).

    u, delta, z: [B, D, L]; A: [D, N] real; B, C: [B, N, L] or [B, G, N, L]; D, delta_bias: [D];
    initial_state: [B, D, N]. Returns out [B, D, L] (u's dtype) and, with `return_last_state`,
    the last state [B, D, N] (fp32). block_d / chunk: channels per program and tokens per chunk
    (powers of two; defaults per device, `_default_tiles`; a block_d given applies to both passes).
    """
    if A.is_complex():
        raise ValueError("selective_scan_triton: complex A is not supported (Mamba uses a real A)")
    (fwd_block, default_chunk, fwd_warps), (bwd_block, _, bwd_warps) = _default_tiles(u.device)
    groups = B.shape[1] if B.dim() == 4 else 1
    chunk = chunk or default_chunk
    fwd_block = _block_d(u.shape[1], groups, block_d or fwd_block)
    bwd_block = _block_d(u.shape[1], groups, block_d or bwd_block)
    if chunk & (chunk - 1) or fwd_block & (fwd_block - 1) or bwd_block & (bwd_block - 1):
        raise ValueError(f"selective_scan_triton: block_d and chunk must be powers of two, got {block_d}, {chunk}")
    tiles = ((fwd_block, fwd_warps), (bwd_block, bwd_warps))
    out, last = SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles, chunk
    )
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------------
# One-token step (generation)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, z_ptr, dt_bias_ptr, out_ptr,
    dim,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    STATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """state: [B, D, N] (updated in place); x, dt, z, out: [B, D]; A: [D, N]; B, C: [B, N]."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < dim
    n_mask = n < STATE
    dn_mask = d_mask[:, None] & n_mask[None, :]
    state_offsets = (pid_b * dim + d[:, None]) * STATE + n[None, :]
    h = tl.load(state_ptr + state_offsets, mask=dn_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * dim + d, mask=d_mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * dim + d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + d[:, None] * STATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * STATE + n, mask=n_mask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * STATE + n, mask=n_mask, other=0.0).to(tl.float32)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + state_offsets, h, mask=dn_mask)
    out = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        out += x * tl.load(Dskip_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * dim + d, mask=d_mask, other=0.0).to(tl.float32)
        out = out * (z * tl.sigmoid(z))
    tl.store(out_ptr + pid_b * dim + d, out, mask=d_mask)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token of the scan, `state` updated in place; arguments as `selective_state_update_ref`.

    state: [B, D, N] (contiguous); x, dt, z: [B, D]; A: [D, N]; B, C: [B, N]; D, dt_bias: [D].
    Returns out [B, D] in x's dtype. Inference only (no autograd): generation runs under no_grad.
    """
    if not state.is_contiguous():
        raise ValueError("selective_state_update_triton: state must be contiguous (it is updated in place)")
    batch, dim = x.shape
    n_state = A.shape[1]
    x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    out = torch.empty_like(x)
    # GPU: 64 channels x N per program, 4 warps: 54 registers (sm_90), no spill (triton_resources)
    block_d = min(GPU_STEP_BLOCK_D if x.is_cuda else 8, triton.next_power_of_2(dim))
    dummy = x
    _state_update_kernel[(batch, triton.cdiv(dim, block_d))](
        state, x, dt, A.contiguous(), B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, out, dim,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        STATE=n_state, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state),
    )
    return out
