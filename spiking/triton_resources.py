"""Compile every Triton kernel for NVIDIA GPUs (no GPU needed) and report registers, spills, shared memory.

Each kernel is compiled at the tiles the code picks on a GPU (`triton_scan.GPU_FWD_TILE`,
`GPU_BWD_TILE`, `GPU_STEP_BLOCK_D`, `triton_neurons.GPU_FWD_TILE`, `GPU_BWD_TILE`) with every
optional input on (the most registers), for fp32 and bf16 tensors, through
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`: Triton's NVIDIA backend and
the `ptxas` in its wheel produce the cubin, and the wheel's `cuobjdump --dump-resource-usage`
reads REG (registers per thread), STACK (bytes of stack: register spills), SHARED, LOCAL.

    python -m spiking.triton_resources                 # table, sm_80 and sm_90
    python -m spiking.triton_resources --json --check  # JSON; exit 1 on a spill or > 128 registers

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels); tests/test_triton_compile.py
runs it in a subprocess. Compiled kernels are cached by Triton (~/.triton/cache), so a second run
takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_REGISTERS = 128  # per thread: 4 warps then leave room for >= 4 programs per SM (64 K registers)
ARCHS = (80, 90)  # A100, H100 / H200
STATE = 16  # Mamba's N


def _kernels():
    """(name, jit function, constexprs, warps, {pointer: dtype in bf16 runs}) at the GPU tiles."""
    from . import triton_neurons, triton_scan

    block_d, chunk, warps = triton_scan.GPU_FWD_TILE
    bwd_block, bwd_chunk, bwd_warps = triton_scan.GPU_BWD_TILE
    scan_flags = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, DELTA_SOFTPLUS=True, HAS_H0=True, STATE=STATE,
                      BLOCK_N=STATE)
    gate_fwd, gate_bwd = triton_neurons.GPU_FWD_TILE, triton_neurons.GPU_BWD_TILE
    half = "bf16"
    return [
        ("_scan_fwd_kernel", triton_scan._scan_fwd_kernel, scan_flags | dict(BLOCK_D=block_d, CHUNK=chunk), warps,
         {p: half for p in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr")}),
        ("_scan_bwd_kernel", triton_scan._scan_bwd_kernel,
         scan_flags | dict(HAS_DLAST=True, BLOCK_D=bwd_block, CHUNK=bwd_chunk), bwd_warps,
         {p: half for p in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "du_ptr", "dz_ptr")}),
        ("_state_update_kernel", triton_scan._state_update_kernel,
         dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, STATE=STATE,
              BLOCK_D=triton_scan.GPU_STEP_BLOCK_D, BLOCK_N=STATE), 4,
         {p: half for p in ("state_ptr", "x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr")}),
        ("_gate_neuron_fwd_kernel", triton_neurons._gate_neuron_fwd_kernel,
         dict(HAS_Z=True, KIND=0, HAS_SGC=True, BLOCK_D=gate_fwd[0], BLOCK_L=gate_fwd[1]), gate_fwd[2],
         {p: half for p in ("y_ptr", "z_ptr", "out_ptr")}),
        ("_gate_neuron_bwd_kernel", triton_neurons._gate_neuron_bwd_kernel,
         dict(HAS_Z=True, KIND=0, NEEDS_DV=True, BLOCK_D=gate_bwd[0], BLOCK_L=gate_bwd[1]), gate_bwd[2],
         {p: half for p in ("y_ptr", "z_ptr", "dout_ptr", "dy_ptr", "dz_ptr")}),
    ]


def _signature(fn, constexprs: dict, pointer_dtypes: dict) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, "fp32")
        elif name in ("LEVELS", "sgc_lambda"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one kernel in `cubin`, from the wheel's cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                                check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups())))


def compile_all(archs=ARCHS, dtypes=("fp32", "bf16")) -> list[dict]:
    """One row per (kernel, arch, dtype): tile, warps and the resource usage ptxas reports."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_resources needs real kernels: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    for name, fn, constexprs, warps, half_pointers in _kernels():
        for arch in archs:
            for dtype in dtypes:
                pointers = half_pointers if dtype == "bf16" else {}
                source = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, constexprs, pointers),
                                                   constexprs=dict(constexprs))
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                usage = resource_usage(compiled.asm["cubin"])
                tile = {k: v for k, v in constexprs.items() if k.startswith(("BLOCK", "CHUNK"))}
                rows.append({"kernel": name, "arch": f"sm_{arch}", "dtype": dtype, "tile": tile, "warps": warps, **usage})
    return rows


def violations(rows: list[dict]) -> list[str]:
    return [
        f"{r['kernel']} {r['arch']} {r['dtype']}: {r['registers']} registers, stack {r['stack']}, local {r['local']}"
        for r in rows
        if r["stack"] or r["local"] or r["registers"] > MAX_REGISTERS
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--check", action="store_true", help=f"exit 1 on a spill or > {MAX_REGISTERS} registers")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, args.dtype)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':26s} {'arch':6s} {'dtype':5s} {'tile':28s} {'warps':>5s} {'regs':>5s} {'stack':>5s} "
              f"{'shared':>6s} {'local':>5s}")
        for r in rows:
            tile = " ".join(f"{k}={v}" for k, v in r["tile"].items())
            print(f"{r['kernel']:26s} {r['arch']:6s} {r['dtype']:5s} {tile:28s} {r['warps']:5d} {r['registers']:5d} "
                  f"{r['stack']:5d} {r['shared']:6d} {r['local']:5d}")
    bad = violations(rows)
    for line in bad:
        print(f"over budget: {line}", file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
