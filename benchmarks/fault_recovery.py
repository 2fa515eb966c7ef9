"""Work lost to a kill: SIGKILL a training stage at a random step, re-run, count the steps redone.

    python benchmarks/fault_recovery.py                       # teacher, 8 kills, save_steps 10
    python benchmarks/fault_recovery.py --stage distill --trials 5 --save-steps 5

A tiny recipe (hidden 16, one block; the stage logs every step, so the step reached is known) is
run up to the stage before the chosen one, once. Then, per trial (seeded): a fresh copy, the CLI in
a subprocess, SIGKILL once the stage has logged a random step k in [1, max_steps - 2], and the same
command again. Steps redone = last step logged before the kill - step of the checkpoint the re-run
resumed from (0 = from scratch). The goal is redone <= save_steps. Prints a table and writes
benchmarks/results/fault_recovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "teacher", "distill", "sparsify")


def recipe_dict(run_dir: Path, max_steps: int, save_steps: int) -> dict:
    train = {"max_steps": max_steps, "batch_size": 4, "save_steps": save_steps, "logging_steps": 1,
             "eval_samples": 4, "eval_blocks": 4, "eval_batch_size": 4}
    return {
        "run": {"name": "fault_recovery", "output_dir": str(run_dir), "seed": 0},
        "model": {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 1, "state_size": 4}}},
        "stages": {
            "data": {"source": {"synthetic": "arithmetic", "digits": [1, 2], "num_problems": 200},
                     "seq_len": 16, "rl_prompts": 16, "test_size": 12},
            "teacher": train,
            "distill": {**train, "calibration_batches": 1},
            "sparsify": {**train, "modules": {"in_proj": {"kind": "atmn", "T": 2}}},
        },
    }


def cli(recipe: Path, until: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe), "--until", until], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_step(stage_dir: Path) -> int:
    try:
        return max((e.get("step", 0) for e in json.loads((stage_dir / "train_log.json").read_text())), default=0)
    except (OSError, ValueError):
        return 0


def newest_checkpoint(stage_dir: Path) -> int:
    steps = [0]
    for folder in (stage_dir / "checkpoints").glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())  # complete: written last
            steps.append(int(folder.name.split("-")[-1]))
        except (OSError, ValueError):
            pass
    return max(steps)


def trial(template: Path, work: Path, stage: str, kill_step: int, args) -> dict:
    run_dir = work / "run"
    shutil.copytree(template, run_dir)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(run_dir, args.max_steps, args.save_steps)))
    child = cli(recipe, stage)
    while logged_step(run_dir / stage) < kill_step:
        if child.poll() is not None:
            raise SystemExit(f"the run ended before step {kill_step}: {child.stderr.read()}")
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at, resume_from = logged_step(run_dir / stage), newest_checkpoint(run_dir / stage)
    start = time.perf_counter()
    rerun = cli(recipe, stage)
    _, stderr = rerun.communicate()
    if rerun.returncode != 0:
        raise SystemExit(f"the re-run failed: {stderr}")
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    return {"kill_target": kill_step, "killed_after_step": killed_at, "resumed_from": resume_from,
            "steps_redone": killed_at - resume_from, "final_steps": manifest["metrics"]["steps"],
            "rerun_wall_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES[1:], default="teacher")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        recipe = base / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(base / "run", args.max_steps, args.save_steps)))
        previous = STAGES[STAGES.index(args.stage) - 1]
        assert cli(recipe, previous).wait() == 0, "building the upstream stages failed"
        (base / "run" / "run.log").unlink(missing_ok=True)
        rows = []
        for i in range(args.trials):
            work = Path(tmp) / f"trial{i}"
            work.mkdir()
            rows.append(trial(base / "run", work, args.stage, rng.randint(1, args.max_steps - 2), args))
            print(rows[-1], flush=True)

    redone = [r["steps_redone"] for r in rows]
    summary = {
        "stage": args.stage, "trials": args.trials, "max_steps": args.max_steps, "save_steps": args.save_steps,
        "steps_redone_mean": sum(redone) / len(redone), "steps_redone_max": max(redone),
        "goal_met": all(r <= args.save_steps for r in redone) and all(r["final_steps"] == args.max_steps for r in rows),
        "machine": f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS=1", "rows": rows,
    }
    print(f"\n{args.stage}: {args.trials} kills at random steps, save_steps {args.save_steps}: steps redone "
          f"mean {summary['steps_redone_mean']:.1f}, max {summary['steps_redone_max']} "
          f"(goal <= {args.save_steps}: {'met' if summary['goal_met'] else 'NOT met'})")
    out = ROOT / "benchmarks" / "results" / "fault_recovery.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
