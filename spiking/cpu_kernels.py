"""CPU fast path: the fused selective scan (forward + backward) as a C++ extension (`cpu_kernels.cpp`).

Same arguments and semantics as `scan.selective_scan_ref` (mamba-ssm's `selective_scan_ref` plus
`initial_state`), fp32 maths, any input dtype (cast to fp32 on the way in, back on the way out):

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t          h: [B, D, N]
    y_t = C_t · h_t + D · u_t,   out_t = y_t · SiLU(z_t)

Why it is fast: the reference materialises [L, B, D, N] buffers (exp(Δ·A), Δ·B·u, the states and
their gradients: ~10 passes over B·L·D·N floats each way); this kernel keeps the state of one
(batch row, 16 channels) in registers while it walks the sequence, computing exp(Δ·A), Δ·B·u
and C·h on the fly, and stores only the state at every `chunk`-th token for the backward, which
recomputes a chunk at a time (see the .cpp header). Tensors are read channel-last ([B, L, D],
unit stride over D): the model's [B, D, L] arguments are transposed views of such tensors, so the
transposes here are free.

The extension is compiled on first use with the g++ torch builds with (~10 s once per machine;
cached under torch's extension folder, keyed by a hash of the source, the flags, torch's version
and the CPU) and loaded with `torch.ops.load_library`; no lock is held while a cached build is
loaded, so a killed process never blocks the next one. When it cannot be built (no compiler,
unwritable cache, a non-x86 g++ without vector extensions, ...) `load_extension()` returns the
reason, and the dispatch (`scan.resolve_backend`) logs it and runs `selective_scan_ref` instead.

Tests: `OMP_NUM_THREADS=1 python -m pytest tests/test_cpu_kernels.py -q`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
# -march=native: the library is built on the machine that runs it (the hash includes the CPU)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
LDFLAGS = ["-fopenmp"]
DEFAULT_CHUNK = 32  # tokens per recomputed chunk: its buffers ([chunk, N, 16] floats x 2) stay in L2

_state: dict[str, object] = {}  # "error": reason it could not load (None: loaded); set once per process


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    key = hashlib.sha256(
        b"\0".join(
            [SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
             sys.version.encode(), _cpu_signature().encode()]
        )
    ).hexdigest()[:16]
    return root / f"spikerl_cpu_{key}"


def _build(target: Path) -> None:
    """Compile into a private temporary folder, then move the library into place atomically."""
    from torch.utils.cpp_extension import load

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".build-", dir=target.parent))
    try:
        logger.info("building the spikerl CPU kernels (once per machine, ~10 s): %s", target)
        load(name="spikerl_cpu_kernels", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             build_directory=str(scratch), is_python_module=False, verbose=False)
        built = scratch / "spikerl_cpu_kernels.so"
        target.mkdir(exist_ok=True)
        tmp = target / f"spikerl_cpu_kernels.so.{os.getpid()}"
        shutil.copyfile(built, tmp)
        os.replace(tmp, target / "spikerl_cpu_kernels.so")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_extension() -> str | None:
    """Load (building it the first time) the C++ kernels; None when loaded, else why not.

    Tried once per process: a failure is remembered, so the fallback is decided (and logged by
    the dispatch) once, not per call.
    """
    if "error" in _state:
        return _state["error"]  # type: ignore[return-value]
    error = None
    if os.environ.get("SPIKERL_CPU_KERNELS", "1") == "0":
        error = "disabled by SPIKERL_CPU_KERNELS=0"
    else:
        try:
            library = _build_dir() / "spikerl_cpu_kernels.so"
            if library.is_file():
                torch.ops.load_library(str(library))
            else:
                _build(library.parent)  # loads the freshly built copy into this process
            torch.ops.spikerl_cpu.scan_fwd  # noqa: B018 - raises if the ops did not register
        except Exception as exc:  # noqa: BLE001 - any failure (compiler, linker, loader) means "absent"
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            error = f"the C++ extension could not be built or loaded ({type(exc).__name__}: {first_line[:300]})"
    _state["error"] = error
    return error


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------


def _channels_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """[B, D, L] -> [B, L, D] fp32 with unit stride over D (free for the model's transposed views)."""
    if t is None:
        return None
    v = t.transpose(1, 2)
    if v.dtype != torch.float32:
        v = v.float()
    return v if v.stride(2) == 1 else v.contiguous()


def _bc_lanes(M: torch.Tensor, name: str) -> torch.Tensor:
    """B or C [B, N, L] / [B, G, N, L] -> [B, G, L, N] fp32 with unit stride over N."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    elif M.dim() != 4:
        raise ValueError(
            f"selective_scan_cpu: {name} must be input-dependent [B, N, L] or [B, G, N, L], got {tuple(M.shape)} "
            "(constant B/C runs on backend='ref')"
        )
    v = M.transpose(2, 3)
    if v.dtype != torch.float32:
        v = v.float()
    return v if v.stride(3) == 1 else v.contiguous()


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class SelectiveScanCPU(torch.autograd.Function):
    """Autograd wrapper of `scan_fwd` / `scan_bwd`; saves the inputs and the chunk-boundary states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk):
        ops = torch.ops.spikerl_cpu
        u_l, delta_l, z_l = _channels_last(u), _channels_last(delta), _channels_last(z)
        B_l, C_l = _bc_lanes(B, "B"), _bc_lanes(C, "C")
        A_t = A.detach().float().t().contiguous()  # [N, D]: one row of A per state, lanes over D
        D_v, bias_v = _vector(D), _vector(delta_bias)
        h0 = None if initial_state is None else initial_state.detach().float().contiguous()
        save = any(ctx.needs_input_grad)
        out, last, chunks = ops.scan_fwd(u_l, delta_l, A_t, B_l, C_l, D_v, z_l, bias_v, bool(delta_softplus), h0,
                                         chunk, save)
        if save:
            ctx.save_for_backward(u_l, delta_l, A_t, B_l, C_l, D_v, z_l, bias_v, chunks)
        ctx.meta = (bool(delta_softplus), chunk, B.dim(), u.dtype, delta.dtype, B.dtype, C.dtype,
                    z.dtype if z is not None else None, initial_state is not None)
        out = out.transpose(1, 2)  # [B, D, L] view
        return out if out.dtype == u.dtype else out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u_l, delta_l, A_t, B_l, C_l, D_v, z_l, bias_v, chunks = ctx.saved_tensors
        softplus, chunk, bc_dim, u_dtype, delta_dtype, B_dtype, C_dtype, z_dtype, has_h0 = ctx.meta
        dout_l = _channels_last(dout)
        dlast = None if dlast is None else dlast.float().contiguous()
        du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = torch.ops.spikerl_cpu.scan_bwd(
            u_l, delta_l, A_t, B_l, C_l, D_v, z_l, bias_v, softplus, chunks, chunk, dout_l, dlast
        )
        needs = ctx.needs_input_grad
        dB, dC = dB.transpose(2, 3), dC.transpose(2, 3)  # [B, G, N, L]
        if bc_dim == 3:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        return (
            du.transpose(1, 2).to(u_dtype) if needs[0] else None,
            ddelta.transpose(1, 2).to(delta_dtype) if needs[1] else None,
            dA.t() if needs[2] else None,
            dB.to(B_dtype) if needs[3] else None,
            dC.to(C_dtype) if needs[4] else None,
            dD if needs[5] else None,
            dz.transpose(1, 2).to(z_dtype) if needs[6] else None,
            dbias if needs[7] else None,
            None,
            dh0 if needs[9] and has_h0 else None,
            None,
        )


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, chunk: int = DEFAULT_CHUNK,
):
    """The fused CPU scan; arguments as `selective_scan_ref` (plus `chunk`, tokens per recomputed chunk).

    u, delta, z: [B, D, L]; A: [D, N] real; B, C: [B, N, L] or [B, G, N, L] (G divides D);
    D, delta_bias: [D]; initial_state: [B, D, N]. Returns out [B, D, L] in u's dtype and, with
    `return_last_state`, the last state [B, D, N] (fp32). Gradients flow to every tensor input.
    The extension must be loaded (`load_extension() is None`); the dispatch checks that.
    """
    if A.is_complex():
        raise ValueError("selective_scan_cpu: complex A is not supported (Mamba uses a real A)")
    out, last = SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------------
# One-token state update (generation)
# ---------------------------------------------------------------------------------------------


def selective_state_update_cpu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token of the scan in C++, `state` updated in place; arguments as `selective_state_update_ref`.

    state: [B, D, N] (fp32, contiguous); x, dt, z: [B, D]; A: [D, N]; B, C: [B, N]; D, dt_bias: [D].
    Returns out [B, D] in x's dtype. Inference only (no autograd): generation runs under no_grad.
    """
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("selective_state_update_cpu: state must be float32 and contiguous (it is updated in place)")

    def rows(t):  # [B, ·] fp32 with unit stride over the last dim
        t = t.detach().float()
        return t if t.stride(-1) == 1 else t.contiguous()

    B_rows, C_rows = rows(B), rows(C)
    if B_rows.stride(0) != C_rows.stride(0):  # the kernel walks B and C with one row stride
        B_rows, C_rows = B_rows.contiguous(), C_rows.contiguous()
    out = torch.ops.spikerl_cpu.state_update(
        state, rows(x), rows(dt), A.detach().float().contiguous(), B_rows, C_rows, _vector(D),
        None if z is None else rows(z), _vector(dt_bias), bool(dt_softplus),
    )
    return out.to(x.dtype)
