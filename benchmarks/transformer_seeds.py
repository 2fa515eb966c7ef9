"""How much the converted student's accuracy depends on the seed of its new mixer weights.

    python benchmarks/transformer_seeds.py [--run runs/transformer-tiny] [--seeds 0 1 2] [--keep 3] [--keep 1,3]
                                           [--keep ""]       (every layer converted, no attention kept)
                                           [--random-init]   (the converted mixers not started from attention)

On a finished run of recipes/transformer-tiny.yaml (its data and Llama teacher), the distill stage
of the recipe runs again once per (keep_attention, seed) into a scratch folder: only the seed of the
weights the conversion draws (the gate z, Δ) and of the Trainer's data order changes; data and
teacher stay the run's. Prints held-out accuracy per seed beside the teacher's, and writes
benchmarks/results/transformer_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "transformer-tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", action="append", default=None, help="comma-separated layer ids; repeat for several")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "transformer-tiny.yaml")
    parser.add_argument("--random-init", action="store_true", help="attention_init: false (Mamba's own init)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/transformer_seeds[_random_init].json)")
    args = parser.parse_args(argv)
    keeps = [[int(i) for i in k.split(",") if i != ""] for k in (args.keep or ["3"])]

    from pipeline.recipe import load_recipe
    from stages import distill
    from stages.context import StageContext

    recipe = load_recipe(args.recipe)
    for stage in ("data", "teacher"):
        if not (args.run / stage / "manifest.json").is_file():
            raise SystemExit(f"{args.run / stage} is not a finished stage: run `spikerl run {args.recipe}` first")
    teacher_accuracy = json.loads((args.run / "teacher" / "manifest.json").read_text())["metrics"]["teacher_accuracy"]
    rows = []
    for keep in keeps:
        for seed in args.seeds:
            cfg = recipe.stages["distill"].model_copy(update={"keep_attention": keep, "attention_init": not args.random_init})
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch) / "distill"
                out.mkdir()
                ctx = StageContext(
                    stage="distill", run_dir=Path(scratch), out_dir=out,
                    upstream={"data": args.run / "data", "teacher": args.run / "teacher"},
                    model=recipe.model, seed=seed, logger=logging.getLogger("seeds"),
                )
                start = time.perf_counter()
                metrics = distill.run(cfg, ctx)
            rows.append({"keep_attention": keep, "seed": seed, "attention_init": not args.random_init, "student_accuracy": metrics["student_accuracy"],
                         "student_ppl": metrics["student_ppl"], "seconds": time.perf_counter() - start})
            print(f"keep {keep} seed {seed}: {metrics['student_accuracy']:.2%} (teacher {teacher_accuracy:.2%})", flush=True)
    summary = {}
    for keep in keeps:
        accs = [r["student_accuracy"] for r in rows if r["keep_attention"] == keep]
        summary[",".join(map(str, keep)) or "none"] = {
            "mean": statistics.mean(accs), "min": min(accs), "max": max(accs),
            "within_5_points": sum(a >= teacher_accuracy - 0.05 for a in accs), "seeds": len(accs),
        }
    for name, s in summary.items():
        print(f"keep [{name}]: mean {s['mean']:.2%}, range [{s['min']:.2%}, {s['max']:.2%}], "
              f"{s['within_5_points']}/{s['seeds']} seeds within 5 points of the teacher ({teacher_accuracy:.2%})")
    result = {"run": str(args.run), "teacher_accuracy": teacher_accuracy, "attention_init": not args.random_init,
              "rows": rows, "summary": summary}
    name = "transformer_seeds_random_init.json" if args.random_init else "transformer_seeds.json"
    out_file = args.out or ROOT / "benchmarks" / "results" / name
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
