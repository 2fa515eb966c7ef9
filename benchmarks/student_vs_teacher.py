"""Training step cost: spiking student vs HF Mamba teacher vs student with neurons off (CPU).

Same weights for all three; one training step = forward + cross-entropy + backward. Each model
runs in its own subprocess so that peak memory (ru_maxrss above the post-setup level) is its own.
A second table times the selective scan alone: this project's `selective_scan_ref` vs
transformers' `mamba_selective_scan` (the loop HF Mamba runs on CPU).

    python benchmarks/student_vs_teacher.py                 # hidden 256, 4 layers, batch 8 x 256
    python benchmarks/student_vs_teacher.py --threads 2 --reps 3 --teacher-reps 2

Prints tables and writes benchmarks/results/student_vs_teacher.json. Figures are ratios within
one run on one machine; never compare absolute seconds across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "student_vs_teacher.json"
VARIANTS = {
    "teacher": "HF MambaForCausalLM",
    "student": "student, SI-LIF D=4 on in_proj+out_proj",
    "student_off": "student, neurons off (spiking=False)",
}


def build(variant: str, args):
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    sys.path.insert(0, str(ROOT))
    from spiking import calibrate, default_neurons, from_teacher

    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16
    )
    teacher = MambaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    if variant == "teacher":
        return teacher.train(), ids
    student = from_teacher(teacher, neurons=default_neurons(D=4), spiking=variant == "student")
    calibrate(student, [{"input_ids": ids[:2]}])
    return student.train(), ids


def measure_one(variant: str, args) -> dict:
    """Runs in a subprocess: time and peak memory of `reps` training steps of one model."""
    import torch

    torch.set_num_threads(args.threads)
    model, ids = build(variant, args)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the teacher's CPU path is ~20x slower: fewer reps keep the run short (ratios stay clear)
    warmup, reps = (args.teacher_warmup, args.teacher_reps) if variant == "teacher" else (args.warmup, args.reps)
    times = []
    for rep in range(warmup + reps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if rep >= warmup:
            times.append(elapsed)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_mem_mib": (peak_kib - base_kib) / 1024,
    }


def measure_scan(args) -> dict:
    """Forward + backward of the selective scan alone, ours vs transformers', one layer's shapes."""
    import torch
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    sys.path.insert(0, str(ROOT))
    from spiking.kernels import selective_scan_ref

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dim, state = 2 * args.hidden, 16
    shapes = [(args.batch, dim, args.seq_len), (64, dim, 24)]
    rows = []
    for batch, dim_, length in shapes:
        tensors = [
            torch.randn(batch, dim_, length, generator=gen),
            0.5 * torch.randn(batch, dim_, length, generator=gen),
            -torch.rand(dim_, state, generator=gen) - 0.5,
            torch.randn(batch, state, length, generator=gen),
            torch.randn(batch, state, length, generator=gen),
            torch.randn(dim_, generator=gen),
            torch.randn(batch, dim_, length, generator=gen),
            0.1 * torch.randn(dim_, generator=gen),
        ]
        for t in tensors:
            t.requires_grad_(True)
        result = {"shape_B_D_L_N": [batch, dim_, length, state]}
        for name, fn in (("ours", selective_scan_ref), ("hf", mamba_selective_scan)):
            times = []
            for _ in range(args.scan_reps):
                u, delta, A, B, C, D, z, delta_bias = tensors
                start = time.perf_counter()
                out = fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
                out.sum().backward()
                times.append(time.perf_counter() - start)
            result[f"{name}_s"] = statistics.median(times)
        result["speedup"] = result["hf_s"] / result["ours_s"]
        rows.append(result)
    return {"scan": rows}


def run_child(what: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", what] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child" and v is not None
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--teacher-reps", type=int, default=2)
    parser.add_argument("--teacher-warmup", type=int, default=0)
    parser.add_argument("--scan-reps", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "scan":
        print(json.dumps(measure_scan(args)))
        return
    if args.child:
        print(json.dumps(measure_one(args.child, args)))
        return

    results = {}
    for variant in VARIANTS:
        results[variant] = run_child(variant, args)
        print(f"  done {variant}: {results[variant]['median_s']:.3f} s", file=sys.stderr, flush=True)
    scan = run_child("scan", args)["scan"]
    teacher = results["teacher"]
    print(f"training step (forward + CE + backward), hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq_len} tokens, {args.threads} threads, median of {args.reps} "
          f"(teacher: {args.teacher_reps})")
    print(f"{'model':44s} {'time s':>8s} {'x teacher':>10s} {'peak MiB':>9s} {'x teacher':>10s}")
    for variant, label in VARIANTS.items():
        r = results[variant]
        r["time_vs_teacher"] = r["median_s"] / teacher["median_s"]
        r["mem_vs_teacher"] = r["peak_mem_mib"] / max(teacher["peak_mem_mib"], 1e-9)
        print(f"{label:44s} {r['median_s']:8.3f} {r['time_vs_teacher']:10.3f} {r['peak_mem_mib']:9.0f} "
              f"{r['mem_vs_teacher']:10.3f}")
    print(f"neurons on vs off (student): time x{results['student']['median_s'] / results['student_off']['median_s']:.2f}")
    print("\nselective scan alone, forward + backward (one layer)")
    print(f"{'[B, D, L, N]':22s} {'ours s':>8s} {'HF s':>8s} {'HF / ours':>10s}")
    for row in scan:
        print(f"{str(row['shape_B_D_L_N']):22s} {row['ours_s']:8.3f} {row['hf_s']:8.3f} {row['speedup']:10.1f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads},
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "models": results,
        "scan": scan,
    }
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(RESULTS)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
