"""Energy per token by op type, summed over layers: teacher vs distilled student of a finished run.

    python benchmarks/energy_breakdown.py runs/tiny          # after `spikerl run recipes/tiny.yaml`

Shows which ops stay dense and dominate the student's energy (methods.md §8). Cost table
45nm-horowitz (MAC 4.6 pJ, AC 0.9 pJ, Mul 3.7 pJ); memory access is not counted. Writes
benchmarks/results/energy_breakdown.json.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

import spiking


def by_op(report: spiking.EnergyReport) -> dict[str, float]:
    """pJ per token of each op type, summed over layers."""
    cost, totals = report.cost, collections.Counter()
    for layer in report.layers:
        for op, count in layer.ops.items():
            totals[op] += count.mac * cost.mac_pj + count.ac * cost.ac_pj + count.mul * cost.mul_pj
    return dict(totals.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", default="distill", help="the student's stage folder (distill, sparsify, rl)")
    parser.add_argument("--blocks", type=int, default=16, help="held-out corpus blocks to count spikes on")
    args = parser.parse_args()

    ids = torch.tensor(load_from_disk(str(args.run_dir / "data" / "corpus"))["test"][: args.blocks]["input_ids"])
    models = {
        "teacher": spiking.from_teacher(str(args.run_dir / "teacher"), neurons={}).eval(),
        "student": AutoModelForCausalLM.from_pretrained(args.run_dir / args.stage).eval(),
    }
    result = {"cost_table": spiking.HOROWITZ_45NM.describe(), "memory_access": "not counted"}
    for name, model in models.items():
        report = spiking.estimate_energy(model, ids)
        ops = by_op(report)
        total = sum(ops.values())
        result[name] = {"pj_per_token": report.pj_per_token, "share": {op: v / total for op, v in ops.items()}}
        print(f"{name}: {report.pj_per_token:,.0f} pJ/token; " + ", ".join(f"{op} {v / total:.1%}" for op, v in ops.items()))
    print(f"ratio teacher/student: {result['teacher']['pj_per_token'] / result['student']['pj_per_token']:.2f}")
    out = Path(__file__).parent / "results" / "energy_breakdown.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
