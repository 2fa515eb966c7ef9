"""Checkpoint overhead and 1- vs 2-process throughput of the tiny recipe's distill stage (CPU).

    python benchmarks/scaling.py [--upstream runs/tiny] [--steps 100]

Needs a finished data + teacher of recipes/tiny.yaml in --upstream (`spikerl run recipes/tiny.yaml
--until teacher`); it is only read. Each measurement runs the real distill stage (HF Trainer,
the recipe's model, neurons, loss and batch) for --steps steps in a fresh temp folder, in a fresh
process, and reads the Trainer's own `train_runtime` (training loop incl. checkpoint saves, without
model loading, calibration and evaluation):

* checkpointing: save every `steps/4` steps (4 saves; the recipe saves every 100 of 300 steps)
  vs. save_steps > max_steps (the Trainer then still saves once, at the last step). Each save is
  timed inside the Trainer (on_step_end -> on_save, incl. deleting checkpoints beyond
  save_total_limit); the share of training and the extrapolation to the recipe's 3 saves follow.
* scaling: samples/s (global: processes × batch per step) of 1 process × 2 threads (both cores),
  1 process × 1 thread, and 2 processes × 1 thread (torchrun, DDP over gloo; same per-process
  batch, so twice the global batch: weak scaling), plus 2 processes × half the batch (same global
  batch as 1 process: strong scaling).

On a 2-core machine 2 processes can at best match 1 process using both cores: they trade
intra-op threads for data parallelism and add an all-reduce per step. The figures say what DDP
costs here, not what it gains on real multi-GPU hardware. Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
NEVER = 10**9  # save_steps beyond max_steps: no checkpoint at all


def save_timer():
    """A TrainerCallback timing each checkpoint save: the Trainer calls on_step_end, then saves,
    then on_save, so the gap between the two at a save step is the save itself."""
    from transformers import TrainerCallback

    class SaveTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self._step_end = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self._step_end = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self._step_end)

    return SaveTimer()


def worker(args: argparse.Namespace) -> None:
    """One distill run (called once per process under torchrun); rank 0 prints the Trainer's figures."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import distributed_state
    from stages import distill
    from stages.context import StageContext

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    cfg = recipe.stages["distill"].model_copy(update={
        "max_steps": args.steps, "save_steps": args.save_steps, "batch_size": args.batch_size,
        "eval_samples": 8, "eval_blocks": 4, "logging_steps": args.steps,  # evaluation is not timed
    })
    dist = distributed_state()
    out = Path(args.out)
    ctx = StageContext(
        stage="distill", run_dir=out.parent, out_dir=out, upstream={s: Path(args.upstream) / s for s in ("data", "teacher")},
        model=recipe.model, seed=recipe.run.seed, is_main_process=dist.is_main_process,
        extra={"process_index": dist.process_index, "num_processes": dist.num_processes, "callbacks": [timer := save_timer()]},
    )
    out.mkdir(parents=True, exist_ok=True)
    distill.run(cfg, ctx)
    if dist.is_main_process:
        final = [e for e in json.loads((out / "train_log.json").read_text()) if "train_runtime" in e][-1]
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
        print("RESULT " + json.dumps({
            "train_runtime_s": final["train_runtime"], "samples_per_s": final["train_samples_per_second"],
            "processes": dist.num_processes, "checkpoints": len(checkpoints),
            "save_s": [round(d, 4) for d in timer.durations],
        }))


def measure(upstream: Path, steps: int, save_steps: int, batch_size: int, processes: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--worker", "--upstream", str(upstream), "--steps", str(steps),
                   "--save-steps", str(save_steps), "--batch-size", str(batch_size), "--out", str(Path(tmp) / "distill")]
        if processes > 1:
            command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes), *command[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    figures = json.loads(line[len("RESULT "):])
    figures.update(batch_per_process=batch_size, threads_per_process=threads, save_steps=save_steps,
                   steps=steps, process_wall_s=round(wall, 1))
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", default=str(ROOT / "runs" / "tiny"), help="run folder with finished data and teacher")
    parser.add_argument("--steps", type=int, default=100, help="distill steps per measurement")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-steps", type=int, default=NEVER, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    upstream = Path(args.upstream)
    for stage in ("data", "teacher"):
        if not (upstream / stage / "manifest.json").is_file():
            raise SystemExit(f"--upstream {upstream}: no finished {stage} stage; run `spikerl run recipes/tiny.yaml --until teacher`")
    from pipeline.recipe import load_recipe

    batch = load_recipe(ROOT / "recipes" / "tiny.yaml").stages["distill"].batch_size
    steps = args.steps

    # checkpoint overhead, 1 process on both cores (the embedded default's setting)
    no_save = measure(upstream, steps, NEVER, batch, processes=1, threads=2)
    save = measure(upstream, steps, steps // 4, batch, processes=1, threads=2)
    # the Trainer also saves once at the last step whatever save_steps says: compare the extra saves
    per_checkpoint = sum(save["save_s"]) / len(save["save_s"])
    # scaling
    one_thread = measure(upstream, steps, NEVER, batch, processes=1, threads=1)
    two_weak = measure(upstream, steps, NEVER, batch, processes=2, threads=1)
    two_strong = measure(upstream, steps, NEVER, batch // 2, processes=2, threads=1)

    recipe_steps, recipe_saves = 300, 3  # recipes/tiny.yaml distill: 300 steps, save_steps 100
    step_s = no_save["train_runtime_s"] / steps
    summary = {
        "checkpoint_s_each": round(per_checkpoint, 3),
        "checkpoint_share_of_training_measured": round(sum(save["save_s"]) / save["train_runtime_s"], 4),
        "runtime_ratio_4_saves_vs_final_save_only": round(save["train_runtime_s"] / no_save["train_runtime_s"], 3),
        "checkpoint_overhead_tiny_recipe": round(recipe_saves * per_checkpoint / (recipe_steps * step_s), 4),
        "samples_per_s": {
            "1proc_2threads": no_save["samples_per_s"],
            "1proc_1thread": one_thread["samples_per_s"],
            "2proc_1thread_same_batch_per_proc": two_weak["samples_per_s"],
            "2proc_1thread_same_global_batch": two_strong["samples_per_s"],
        },
        "ratio_2proc_vs_1proc_2threads": round(two_weak["samples_per_s"] / no_save["samples_per_s"], 3),
        "ratio_2proc_vs_1proc_1thread": round(two_weak["samples_per_s"] / one_thread["samples_per_s"], 3),
        "ratio_2proc_same_global_batch_vs_1proc_2threads": round(two_strong["samples_per_s"] / no_save["samples_per_s"], 3),
    }
    print(f"checkpoint: {per_checkpoint:.3f} s each; {summary['checkpoint_share_of_training_measured']:.1%} of training with "
          f"{len(save['save_s'])} saves in {steps} steps (runtime ratio vs 1 final save: "
          f"{summary['runtime_ratio_4_saves_vs_final_save_only']}); the tiny recipe's 3 saves in 300 steps: "
          f"{summary['checkpoint_overhead_tiny_recipe']:.1%}")
    print(f"samples/s: 1 proc × 2 threads {no_save['samples_per_s']}, 1 proc × 1 thread {one_thread['samples_per_s']}, "
          f"2 procs × 1 thread {two_weak['samples_per_s']} (batch {batch}/proc), {two_strong['samples_per_s']} (batch {batch // 2}/proc)")
    print(f"ratio 2 procs / 1 proc (2 threads): {summary['ratio_2proc_vs_1proc_2threads']}; "
          f"/ 1 proc (1 thread): {summary['ratio_2proc_vs_1proc_1thread']}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "summary": summary,
        "runs": {"no_save": no_save, "save": save, "one_thread": one_thread, "two_proc": two_weak, "two_proc_half_batch": two_strong},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_at_end": os.getloadavg(),  # other work on the machine skews every figure
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
