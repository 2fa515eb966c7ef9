"""Projected energy ratio at mamba-130m and mamba-1.4b shapes, from the spike rates of a trained student.

    python benchmarks/energy_projection.py                              # runs/tiny-energy/sparsify
    python benchmarks/energy_projection.py --model runs/tiny/sparsify --data runs/tiny/data

A projection, not a measurement (methods.md §10): the student's neurons are run once on the held-out
corpus blocks of its data stage; the spike rates per placement (Σ|s|, events and the fraction of
tokens in which a channel fires, per channel per token, averaged over layers) are then applied to a
model of another shape built on the meta device, for every placement set the student measured
(each a subset of its placements, the rest dense), and counted by the same `spiking.energy` code
as the measured figures. The teacher at each shape is the same model with no neurons. Rates
measured at one width need not hold at another; they are what the tiny run shows.

Prints one table per cost model (45nm-horowitz compute only; against the INT8 teacher; 45nm-memory
at batch 1) and writes benchmarks/results/energy_projection.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "energy_projection.json"
sys.path.insert(0, str(ROOT))
PAPER = ("in_proj", "out_proj")  # SpikingMamba's placement


def placement_sets(measured: list[str]) -> list[tuple[str, ...]]:
    """The paper's set (when measured), each measured placement added to it, and all of them."""
    sets = [tuple(p for p in PAPER if p in measured)]
    others = [p for p in measured if p not in PAPER]
    sets += [sets[0] + (p,) for p in others]
    sets.append(tuple(measured))
    return list(dict.fromkeys(s for s in sets if s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "tiny-energy" / "sparsify", help="a spiking stage's folder")
    parser.add_argument("--data", type=Path, default=None, help="its data stage's folder (default: beside the model)")
    parser.add_argument("--blocks", type=int, default=16, help="held-out corpus blocks the rates are measured on")
    args = parser.parse_args()

    import torch
    from datasets import load_from_disk

    import spiking
    from scripts.make_local_teacher import config_for

    data = args.data or args.model.parent / "data"
    model = spiking.load_deployed(args.model)
    blocks = load_from_disk(str(data / "corpus"))["test"].select(range(args.blocks))
    _, stats = spiking.measure(model, torch.tensor(blocks["input_ids"]))
    rates = spiking.placement_rates(stats, model)
    neurons = dict(model.config.neurons)
    measured = [p for p in spiking.PLACEMENTS if p in rates]
    costs = {"45nm-horowitz": spiking.HOROWITZ_45NM, "45nm-int8": spiking.HOROWITZ_45NM_INT8, "45nm-memory": spiking.memory_model(1)}

    own = {k: v for k, v in model.config.to_dict().items() if k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                     "state_size", "expand", "conv_kernel", "mlp_intermediate_size")}
    shapes = {"measured (the student's own)": own}
    for shape in ("mamba-130m", "mamba-1.4b"):
        shapes[shape] = {k: v for k, v in config_for(shape).to_dict().items() if k in own}
    rows = []
    for shape_name, fields in shapes.items():
        teacher = {name: spiking.project(spiking.SpikingMambaConfig(**fields, neurons={}), {}, cost).pj_per_token
                   for name, cost in costs.items()}
        for subset in placement_sets(measured):
            config = spiking.SpikingMambaConfig(**fields, neurons={p: neurons[p] for p in subset})
            student = {name: spiking.project(config, rates, cost).pj_per_token for name, cost in costs.items()}
            rows.append({
                "shape": shape_name, "placements": list(subset),
                "ratio_45nm_horowitz": teacher["45nm-horowitz"] / student["45nm-horowitz"],
                "ratio_vs_int8_teacher": teacher["45nm-int8"] / student["45nm-horowitz"],
                "ratio_45nm_int8": teacher["45nm-int8"] / student["45nm-int8"],
                "ratio_45nm_memory_b1": teacher["45nm-memory"] / student["45nm-memory"],
                "teacher_pj": teacher, "student_pj": student,
            })

    print(f"Projection from the spike rates of {args.model} on {args.blocks} held-out blocks "
          f"(firing rate {stats.firing_rate:.4f}); rates per placement:")
    for placement, rate in rates.items():
        print(f"  {placement}: Σ|s| {rate.spikes:.4f}, events {rate.events:.4f}, active {rate.active:.4f} per channel per token")
    print("\n| shape | placements | 45nm-horowitz | vs INT8 teacher | 45nm-int8 | 45nm-memory b1 |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {', '.join(row['placements'])} | {row['ratio_45nm_horowitz']:.2f}x | "
              f"{row['ratio_vs_int8_teacher']:.2f}x | {row['ratio_45nm_int8']:.2f}x | {row['ratio_45nm_memory_b1']:.2f}x |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "model": str(args.model), "blocks": args.blocks,
        "firing_rate": stats.firing_rate, "rates": {p: vars(r) for p, r in rates.items()},
        "cost_models": {name: cost.describe() for name, cost in costs.items()}, "rows": rows,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
