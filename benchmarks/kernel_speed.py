"""Kernel benchmarks: selective scan and fused gate + neuron, forward + backward.

With CUDA (issue 7's measurement), at batch 8, d_inner 2048, d_state 16, lengths 512..8192:
  * selective scan fwd+bwd: this project's Triton kernel vs mamba-ssm's CUDA `selective_scan_fn`
    (when installed) vs the PyTorch reference; achieved memory bandwidth (the bytes a scan must
    move at least: inputs read, outputs written, once per pass) as a fraction of the GPU's peak.
    Goals: Triton within 1.2x of mamba-ssm, above 60% of peak bandwidth.
  * gate + SI-LIF fwd+bwd: the fused Triton kernel vs the unfused PyTorch sequence (goal >= 2x).
Without CUDA (no Triton kernel can run outside the ~1000x slower interpreter), the CPU part:
  * the scan's fwd+bwd time vs length, the C++ kernel (backend "cpu") beside the PyTorch reference
    (both should scale linearly: time per token flat),
  * the unfused PyTorch gate + neuron, for scale.

    python benchmarks/kernel_speed.py                          # CPU part here; GPU part too with CUDA
    python benchmarks/kernel_speed.py --cpu-dim 256 --threads 2 --reps 3
    python benchmarks/kernel_speed.py --skip-cpu --out /tmp/k.json   # the GPU part only (scripts/gpu_check.sh)

Prints tables and writes benchmarks/results/kernels.json. Figures are ratios within one run on one
machine; never compare absolute seconds across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kernels.json"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from spiking.kernels import gate_neuron, gate_neuron_ref, selective_scan, selective_scan_ref  # noqa: E402
from spiking.cpu_kernels import load_extension, selective_scan_cpu  # noqa: E402
from spiking.kernels import MAMBA_SSM_AVAILABLE, TRITON_AVAILABLE  # noqa: E402

from quiet import Quiet, interleaved  # noqa: E402 - benchmarks/quiet.py, beside this script

# Nominal peak memory bandwidth (GB/s, vendor figures) by device-name fragment; the measured copy
# bandwidth is reported beside it.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def scan_inputs(batch, dim, state, length, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    tensors = {
        "u": r(batch, dim, length).to(dtype), "delta": (0.5 * r(batch, dim, length)).to(dtype),
        "A": -torch.rand(dim, state, generator=gen, device=device) - 0.5,
        "B": r(batch, state, length).to(dtype), "C": r(batch, state, length).to(dtype),
        "D": r(dim), "z": r(batch, dim, length).to(dtype), "delta_bias": 0.1 * r(dim),
    }
    return {k: v.requires_grad_(True) for k, v in tensors.items()}


def scan_fwd_bwd(fn, x):
    out = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
             delta_softplus=True)
    torch.autograd.grad(out, list(x.values()), grad_outputs=torch.ones_like(out))


def time_it(fn, reps, warmup, cuda):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_min_bytes(batch, dim, state, length, elem):
    """Bytes a fused scan must move, fwd + bwd: [B, D, L] and [B, N, L] tensors once per pass.

    fwd reads u, delta, z, B, C and writes out; bwd reads u, delta, z, B, C, dout and writes du,
    ddelta, dz, dB, dC. Parameters ([D, N], [D]) and the chunk-boundary states are left out.
    """
    bdl, bnl = batch * dim * length * elem, batch * state * length * elem
    return (3 * bdl + 2 * bnl + bdl) + (4 * bdl + 2 * bnl) + (3 * bdl + 2 * bnl)


# ---------------------------------------------------------------------------------------------
# CPU: the reference's scaling with length
# ---------------------------------------------------------------------------------------------


def cpu_part(args) -> dict:
    torch.set_num_threads(args.threads)
    cpu_error = load_extension()
    quiet = Quiet(args.quiet_threshold, args.max_wait)  # the machine is shared: drop disturbed rounds
    rows = []
    for length in args.lengths:
        x = scan_inputs(args.cpu_batch, args.cpu_dim, args.state, length, "cpu", torch.float32)
        fns = {"ref": lambda x=x: scan_fwd_bwd(selective_scan_ref, x)}
        if cpu_error is None:
            fns["cpu"] = lambda x=x: scan_fwd_bwd(selective_scan_cpu, x)
        times = interleaved(fns, args.reps, warmup=1, quiet=quiet)  # ref and cpu round by round
        seconds = statistics.median(times["ref"])
        row = {"length": length, "ref_fwd_bwd_s": seconds, "us_per_token": 1e6 * seconds / length}
        if cpu_error is None:
            row["cpu_fwd_bwd_s"] = statistics.median(times["cpu"])
            row["cpu_us_per_token"] = 1e6 * row["cpu_fwd_bwd_s"] / length
            row["ref_vs_cpu"] = seconds / row["cpu_fwd_bwd_s"]
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["time_vs_first"] = row["ref_fwd_bwd_s"] / base["ref_fwd_bwd_s"]
        row["length_vs_first"] = row["length"] / base["length"]
    # least-squares slope of log(time) on log(length): 1.0 = linear
    import math

    lx = [math.log(r["length"]) for r in rows]
    ly = [math.log(r["ref_fwd_bwd_s"]) for r in rows]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)

    gate_rows = []
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        y = torch.randn(args.cpu_batch, args.cpu_dim, length, generator=gen, requires_grad=True)
        z = torch.randn(args.cpu_batch, args.cpu_dim, length, generator=gen, requires_grad=True)
        V = torch.full((args.cpu_dim,), 0.3, requires_grad=True)

        def unfused():
            out = gate_neuron_ref(y, z, V, "si_lif", 4)
            torch.autograd.grad(out, [y, z, V], grad_outputs=torch.ones_like(out))

        gate_rows.append({"length": length, "unfused_ref_fwd_bwd_s": time_it(unfused, args.reps, 1, cuda=False)})
    return {"shape_B_D_N": [args.cpu_batch, args.cpu_dim, args.state], "scan_ref": rows,
            "log_log_slope": slope, "gate_neuron_ref": gate_rows, "cpu_kernel_error": cpu_error,
            "rounds_dropped_for_load": quiet.dropped, "others_cores_in_kept_rounds": quiet.others_cores,
            "quiet_deadline_reached": time.monotonic() >= quiet.deadline}


# ---------------------------------------------------------------------------------------------
# GPU: Triton vs mamba-ssm vs reference; fused gate + neuron vs unfused
# ---------------------------------------------------------------------------------------------


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth (read + write) of a 1 GiB tensor."""
    src = torch.empty(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), reps=10, warmup=3, cuda=True)
    return 2 * src.numel() * 4 / seconds / 1e9


def gpu_part(args) -> dict:  # pragma: no cover - needs CUDA
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    copy_gbps = copy_bandwidth_gbps()
    backends = {"triton": lambda *a, **k: selective_scan(*a, **k, backend="triton"), "ref": selective_scan_ref}
    if MAMBA_SSM_AVAILABLE:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        backends["mamba_ssm"] = selective_scan_fn
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for length in args.lengths:
            x = scan_inputs(args.batch, args.dim, args.state, length, "cuda", dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "length": length}
            for label, fn in backends.items():
                try:
                    # fn, x bound now: the lambda must not see a later iteration's (or a deleted) x
                    row[f"{label}_ms"] = 1e3 * time_it(lambda fn=fn, x=x: scan_fwd_bwd(fn, x), args.reps, 2, cuda=True)
                except torch.cuda.OutOfMemoryError:
                    row[f"{label}_ms"] = None  # the reference keeps [L, B, D, N] buffers
                torch.cuda.empty_cache()
            nbytes = scan_min_bytes(args.batch, args.dim, args.state, length, torch.empty(0, dtype=dtype).element_size())
            row["triton_gbps"] = nbytes / (row["triton_ms"] / 1e3) / 1e9
            row["triton_frac_of_peak"] = row["triton_gbps"] / peak if peak else None
            row["triton_frac_of_copy"] = row["triton_gbps"] / copy_gbps
            if row.get("mamba_ssm_ms"):
                row["triton_vs_mamba_ssm"] = row["triton_ms"] / row["mamba_ssm_ms"]
            if row.get("ref_ms"):
                row["ref_vs_triton"] = row["ref_ms"] / row["triton_ms"]
            rows.append(row)
            del x

    gate_rows = []
    for length in args.lengths:
        gen = torch.Generator(device="cuda").manual_seed(0)
        y = torch.randn(args.batch, args.dim, length, generator=gen, device="cuda", requires_grad=True)
        z = torch.randn(args.batch, args.dim, length, generator=gen, device="cuda", requires_grad=True)
        V = torch.full((args.dim,), 0.3, device="cuda", requires_grad=True)

        def run(fn):
            out = fn(y, z, V, "si_lif", 4)
            torch.autograd.grad(out, [y, z, V], grad_outputs=torch.ones_like(out))

        fused = 1e3 * time_it(lambda: run(lambda *a: gate_neuron(*a, backend="triton")), args.reps, 2, cuda=True)
        unfused = 1e3 * time_it(lambda: run(gate_neuron_ref), args.reps, 2, cuda=True)
        gate_rows.append({"length": length, "fused_ms": fused, "unfused_ms": unfused, "speedup": unfused / fused})
    return {"device": name, "peak_gbps_nominal": peak, "copy_gbps_measured": copy_gbps,
            "shape_B_D_N": [args.batch, args.dim, args.state], "scan": rows, "gate_neuron": gate_rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048, help="d_inner (GPU part)")
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--cpu-batch", type=int, default=1)
    parser.add_argument("--cpu-dim", type=int, default=256, help="d_inner of the CPU part (the ref keeps [L, B, D, N])")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
    parser.add_argument("--quiet-threshold", type=float, default=0.15,
                        help="CPU part: drop a round in which other processes kept more than this many cores busy")
    parser.add_argument("--max-wait", type=float, default=900, help="CPU part: seconds of waiting for quiet, in all")
    args = parser.parse_args()

    payload = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "triton": TRITON_AVAILABLE, "mamba_ssm": MAMBA_SSM_AVAILABLE},
        "settings": vars(args),
    }
    if not args.skip_cpu:
        cpu = payload["cpu"] = cpu_part(args)
        print(f"CPU scan, fwd+bwd, [B, D, N] = {cpu['shape_B_D_N']}, {args.threads} threads, median of {args.reps}"
              + (f" (C++ kernel unavailable: {cpu['cpu_kernel_error']})" if cpu["cpu_kernel_error"] else ""))
        print(f"{'L':>6s} {'ref s':>9s} {'us/token':>9s} {'x time':>7s} {'x L':>5s} {'cpu s':>9s} {'ref/cpu':>8s} "
              f"{'gate+SI-LIF unfused s':>22s}")
        for row, gate in zip(cpu["scan_ref"], cpu["gate_neuron_ref"]):
            cpu_s = f"{row['cpu_fwd_bwd_s']:9.4f} {row['ref_vs_cpu']:8.1f}" if "cpu_fwd_bwd_s" in row else f"{'-':>9s} {'-':>8s}"
            print(f"{row['length']:6d} {row['ref_fwd_bwd_s']:9.3f} {row['us_per_token']:9.1f} "
                  f"{row['time_vs_first']:7.2f} {row['length_vs_first']:5.0f} {cpu_s} {gate['unfused_ref_fwd_bwd_s']:22.4f}")
        print(f"log-log slope of time vs length: {cpu['log_log_slope']:.3f} (1.0 = linear)")
    if torch.cuda.is_available():  # pragma: no cover - needs CUDA
        gpu = payload["gpu"] = gpu_part(args)
        print(f"\n{gpu['device']}: selective scan fwd+bwd, [B, D, N] = {gpu['shape_B_D_N']} "
              f"(peak {gpu['peak_gbps_nominal']} GB/s nominal, copy {gpu['copy_gbps_measured']:.0f} GB/s measured)")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{'dtype':>8s} {'L':>6s} {'triton ms':>10s} {'mamba ms':>9s} {'ref ms':>9s} {'tri/mamba':>9s} "
              f"{'GB/s':>7s} {'of peak':>8s}")
        for r in gpu["scan"]:
            print(f"{r['dtype']:>8s} {r['length']:6d} {fmt(r['triton_ms'], '10.2f')} {fmt(r.get('mamba_ssm_ms'), '9.2f')} "
                  f"{fmt(r['ref_ms'], '9.2f')} {fmt(r.get('triton_vs_mamba_ssm'), '9.2f')} {r['triton_gbps']:7.0f} "
                  f"{fmt(r['triton_frac_of_peak'], '8.2f')}")
        print("\nfused gate + SI-LIF (D=4) vs unfused PyTorch, fwd+bwd")
        for r in gpu["gate_neuron"]:
            print(f"L {r['length']:6d}: fused {r['fused_ms']:.3f} ms, unfused {r['unfused_ms']:.3f} ms, x{r['speedup']:.2f}")
    else:
        print("\nno CUDA: the Triton-vs-mamba-ssm comparison, bandwidth and fused-kernel speedup need a GPU")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
