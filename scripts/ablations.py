"""Re-run one stage of a finished tiny run under the README's ablation settings and print the table.

    .venv/bin/python scripts/ablations.py distill    # needs runs/tiny (bash scripts/quickstart.sh)
    .venv/bin/python scripts/ablations.py sparsify
    .venv/bin/python scripts/ablations.py rl
    .venv/bin/python scripts/ablations.py rl spike_energy     # only the rows whose label contains it

Each row copies the finished upstream stages of runs/tiny to runs/ablations/<stage>/<row>/ and
runs `spikerl run recipes/tiny.yaml --only <stage> run.output_dir=… <overrides>` there, so every
row starts from the same upstream models, through the same CLI a user would type. One process
at a time, OMP_NUM_THREADS=1 (comparable rows, no oversubscription).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "runs" / "tiny"
ORDER = ["data", "teacher", "distill", "sparsify", "rl"]

ATMN = "{in_proj: {kind: atmn, T: 4}, out_proj: {kind: atmn, T: 4}}"
# a stronger GRPO update: the spike-rate term needs the thresholds to move
STRONG = (
    "stages.rl.trl={max_steps: 200, num_generations: 8, per_device_train_batch_size: 32, learning_rate: 3.0e-4,"
    " beta: 0.0, gradient_checkpointing: false, logging_steps: 20, save_steps: 100}"
)
ROWS: dict[str, dict[str, list[str]]] = {
    "distill": {
        "base (the recipe)": [],
        "SGC off": ["stages.distill.sgc=false"],
        "D=1": ["stages.distill.neuron.D=1"],
        "D=2": ["stages.distill.neuron.D=2"],
        "D=8": ["stages.distill.neuron.D=8"],
        "hidden loss off": ["stages.distill.loss.hidden=0"],
        "CE off (pure KD)": ["stages.distill.loss.ce=0"],
    },
    "sparsify": {
        "binary spikes (SI-LIF D=1), forward KL, post-norm": [
            "stages.sparsify.modules={in_proj: {kind: si_lif, D: 1}, out_proj: {kind: si_lif, D: 1}}",
            "stages.sparsify.sbds={alpha: 1.0, beta: 0.0, gamma: 1.0, ce: 1.0, features: post_norm}",
        ],
        "+ ATMN T=4": [f"stages.sparsify.modules={ATMN}", "stages.sparsify.sbds={alpha: 1.0, beta: 0.0, gamma: 1.0, ce: 1.0, features: post_norm}"],
        "+ reverse KL (alpha 0.2, beta 0.7)": [f"stages.sparsify.modules={ATMN}", "stages.sparsify.sbds={alpha: 0.2, beta: 0.7, gamma: 1.0, ce: 1.0, features: post_norm}"],
        "+ pre-norm features (the recipe)": [],
        "the recipe, thresholds calibrated (not inherited)": ["stages.sparsify.threshold_init=calibrate"],
        "the recipe, no CE term (pure SBDS)": ["stages.sparsify.sbds.ce=0"],
        "the recipe, neither (pure SBDS, calibrated)": ["stages.sparsify.sbds.ce=0", "stages.sparsify.threshold_init=calibrate"],
    },
    "rl": {
        "GRPO (the recipe)": [],
        "RLOO": ["stages.rl.algo=rloo"],
        "DPO (pairs sampled from the policy)": [
            "stages.rl.algo=dpo",
            "stages.rl.trl={max_steps: 100, learning_rate: 3.0e-5, per_device_train_batch_size: 16, beta: 0.1, logging_steps: 20, save_steps: 50}",
        ],
        "PPO (value head, GAE)": [
            "stages.rl.algo=ppo",
            "stages.rl.trl={}",
            "stages.rl.ppo={max_steps: 100, batch_size: 16, num_generations: 2, mini_batch_size: 32, ppo_epochs: 2, learning_rate: 3.0e-5}",
        ],
        "GRPO, lr 3e-4, 200 steps (the energy rows' baseline)": [STRONG],
        "GRPO, lr 3e-4, 200 steps + spike_energy 0.1": [STRONG, "stages.rl.rewards=[arith_exact, {spike_energy: 0.1}]"],
        "GRPO, lr 3e-4, 200 steps + spike_energy 0.3": [STRONG, "stages.rl.rewards=[arith_exact, {spike_energy: 0.3}]"],
        "GRPO, lr 3e-4, 200 steps + spike_energy 1.0": [STRONG, "stages.rl.rewards=[arith_exact, {spike_energy: 1.0}]"],
        "GRPO, lr 3e-4, 200 steps + spike_energy 3.0": [STRONG, "stages.rl.rewards=[arith_exact, {spike_energy: 3.0}]"],
    },
}
COLUMNS = {  # metric -> header, per stage
    "distill": {"student_accuracy": "accuracy", "converted_accuracy": "converted", "firing_rate": "firing rate", "energy_ratio": "energy ratio"},
    "sparsify": {"student_accuracy": "accuracy", "firing_rate/in_proj": "firing in", "firing_rate/out_proj": "firing out", "energy_ratio": "energy ratio"},
    "rl": {"accuracy_before": "accuracy before", "accuracy_after": "accuracy after", "firing_rate_before": "firing before",
           "firing_rate_after": "firing after", "energy_ratio_after": "energy ratio after"},
}


def run_row(stage: str, label: str, overrides: list[str], index: int) -> dict:
    run_dir = ROOT / "runs" / "ablations" / stage / f"row{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for upstream in ORDER[: ORDER.index(stage)]:
        shutil.copytree(SOURCE / upstream, run_dir / upstream)
    command = [sys.executable, "-m", "pipeline", "run", "recipes/tiny.yaml", "--only", stage, f"run.output_dir={run_dir}", *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"row '{label}' failed:\n{done.stderr[-2000:]}")
    return json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]


def main() -> None:
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    if stage not in ROWS:
        raise SystemExit(f"usage: scripts/ablations.py {{{' | '.join(ROWS)}}}")
    if not (SOURCE / ORDER[ORDER.index(stage) - 1] / "manifest.json").is_file():
        raise SystemExit(f"{SOURCE} has no finished upstream for {stage}: run bash scripts/quickstart.sh first")
    columns = COLUMNS[stage]
    print(f"| {stage} variant | " + " | ".join(columns.values()) + " |")
    print("| --- |" + " --- |" * len(columns))
    results = {}
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for index, (label, overrides) in enumerate(ROWS[stage].items()):
        if only not in label:
            continue
        metrics = run_row(stage, label, overrides, index)
        results[label] = metrics
        cells = [f"{metrics[key]:.4f}" if isinstance(metrics.get(key), float) else str(metrics.get(key)) for key in columns]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    out = ROOT / "runs" / "ablations" / f"{stage}{('-' + only.replace(' ', '_')) if only else ''}.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
