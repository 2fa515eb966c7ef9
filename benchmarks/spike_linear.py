"""The spike-driven projection against the dense matmul, by share of nonzero inputs (CPU).

`spikerl_cpu::spike_linear(x, W^T, bias)` reads only the rows of W^T whose input entry is nonzero
(spiking/cpu_kernels.cpp); the fused one-token step uses it for a projection a neuron feeds when at most
`max_density(batch)` of its inputs fired, else ATen's dense matmul (what F.linear runs). This
prints the time of each and their ratio at the projections' shapes of the small recipe (d256, a
4,096-token vocabulary) and of mamba-130m, for decode batches 1, 16 and 64, so the crossing
density can be read off.

    python benchmarks/spike_linear.py                 # 2 threads
    python benchmarks/spike_linear.py --threads 1 --reps 200

Writes benchmarks/results/spike_linear.json. Ratios from one run; the inputs are random spikes
(s·V, s in {-4..4}) at the given density.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spiking import cpu_kernels  # noqa: E402

SHAPES = {
    "in_proj d256 (256 -> 1024)": (256, 1024),
    "out_proj d256 (512 -> 256)": (512, 256),
    "x_proj d256 (512 -> 48)": (512, 48),
    "LM head d256, 4k vocab (256 -> 4096)": (256, 4096),
    "in_proj mamba-130m (768 -> 3072)": (768, 3072),
    "out_proj mamba-130m (1536 -> 768)": (1536, 768),
}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


def spikes(batch: int, K: int, density: float, generator: torch.Generator) -> torch.Tensor:
    s = torch.randint(1, 5, (batch, K), generator=generator).float() * (torch.randint(0, 2, (batch, K), generator=generator) * 2 - 1)
    keep = torch.rand(batch, K, generator=generator) < density
    return s * keep * (0.1 + torch.rand(K, generator=generator))  # per-channel threshold V


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spike_linear.json"))
    args = parser.parse_args()
    why = cpu_kernels.load_extension()
    if why is not None:
        sys.exit(f"the C++ extension did not load: {why}")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':36s} {'batch':>5s} {'density':>7s} {'dense µs':>9s} {'spike µs':>9s} {'dense/spike':>11s}")
    for shape, (K, O) in SHAPES.items():
        weight = torch.randn(O, K, generator=g) / K**0.5
        WT = weight.t().contiguous()
        for batch in args.batches:
            for density in DENSITIES:
                x = spikes(batch, K, density, g)
                dense = timed(lambda: F.linear(x, weight), args.reps)
                sparse = timed(lambda: torch.ops.spikerl_cpu.spike_linear(x, WT, None), args.reps)
                err = (torch.ops.spikerl_cpu.spike_linear(x, WT, None) - F.linear(x, weight)).abs().max().item()
                rows.append({"shape": shape, "K": K, "O": O, "batch": batch, "density": density, "dense_s": dense,
                             "spike_s": sparse, "dense_over_spike": dense / sparse, "max_abs_diff": err})
                print(f"{shape:36s} {batch:5d} {density:7.2f} {dense * 1e6:9.1f} {sparse * 1e6:9.1f} {dense / sparse:10.2f}x")
    payload = {"what": "spike_linear vs the dense matmul (F.linear) by input density", "date": datetime.date.today().isoformat(),
               "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                           "threads": args.threads}, "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
