"""What a no-op `spikerl run` costs: a finished tiny data + teacher run, run again (all skipped).

    python benchmarks/pipeline_overhead.py [--repeats 3]

Prints, in one run on this machine: the bare Python start, importing the stage modules (torch,
transformers, datasets: needed to type-check the recipe), and the whole no-op `python -m pipeline
run` (imports + recipe check + fingerprints + plan). The difference of the last two is the
runner's own overhead. Writes benchmarks/results/pipeline_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "run": {"name": "overhead", "seed": 0},
    "model": {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 1, "state_size": 4}}},
    "stages": {
        "data": {"source": {"synthetic": "arithmetic", "digits": [1, 2], "num_problems": 100},
                 "seq_len": 16, "rl_prompts": 8, "test_size": 10},
        "teacher": {"max_steps": 12, "batch_size": 4, "save_steps": 4, "eval_samples": 4, "eval_blocks": 4},
    },
}


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = dict(RECIPE, run=dict(RECIPE["run"], output_dir=str(Path(tmp) / "run")))
        path = Path(tmp) / "overhead.yaml"
        path.write_text(yaml.safe_dump(recipe))
        run = [sys.executable, "-m", "pipeline", "run", str(path)]
        timed(run, env)  # the real run, once
        figures = {
            "python_start_s": [timed([sys.executable, "-c", "pass"], env) for _ in range(args.repeats)],
            "import_stages_s": [timed([sys.executable, "-c", "import stages.data, stages.teacher"], env)
                                for _ in range(args.repeats)],
            "noop_run_s": [timed(run, env) for _ in range(args.repeats)],
        }
    result = {name: round(statistics.median(values), 3) for name, values in figures.items()}
    result["runner_overhead_s"] = round(result["noop_run_s"] - result["import_stages_s"], 3)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    for name, value in result.items():
        print(f"{name:20s} {value}")
    out = ROOT / "benchmarks" / "results" / "pipeline_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
