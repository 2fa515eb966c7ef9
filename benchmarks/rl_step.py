"""Where an RL step goes: the wall time of TRL GRPO steps on the tiny run's model, split into
generation, rewards, the loss forward and the rest (backward, optimizer, TRL's bookkeeping).

    python benchmarks/rl_step.py                          # runs/tiny's sparsify model, the tiny recipe's GRPO
    python benchmarks/rl_step.py --steps 12 --threads 2

Timers: `policy.generate` (the rollouts: recurrent generation, one token at a time with the cache),
each reward function, and the trainer's public `compute_loss` (the log-prob forward of prompt +
completion, and the spike-rate term when on); the step itself from a `TrainerCallback`
(on_step_begin → on_step_end, which includes the optimizer step). "rest" = step − the three:
the backward, the optimizer, GRPO's advantages and logging. Two settings are timed: the recipe's
rewards ([arith_exact]) and the energy-aware setting ([arith_exact, {spike_energy: 0.3}], energy
penalty in the loss: the reward is still computed, one extra no-grad forward, and the loss
forward carries the spike-rate term). The first `--warmup` steps are not counted. Prints the shares and writes
benchmarks/results/rl_step.json. Shares within one run on one machine; never compare absolute
figures across machines.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import trl
import yaml
from datasets import load_from_disk
from transformers import AutoTokenizer, TrainerCallback

import rewards
from stages import rl, tasks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rl_step.json"


class Timers:
    """Seconds spent per phase during the counted steps."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counting = False

    def add(self, phase: str, seconds: float) -> None:
        if self.counting:
            self.totals[phase] = self.totals.get(phase, 0.0) + seconds

    def wrap(self, phase: str, func):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return timed


class StepTimer(TrainerCallback):
    """Times each optimizer step; counts from step `warmup` + 1 on."""

    def __init__(self, timers: Timers, warmup: int):
        self.timers, self.warmup, self.steps, self._start = timers, warmup, 0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.timers.counting = state.global_step >= self.warmup
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.timers.counting:
            self.timers.add("step", time.perf_counter() - self._start)
            self.steps += 1


class TimedGRPO(rl.GRPOWithSpikeRate):
    """The rl stage's GRPO trainer with its public `compute_loss` timed."""

    timers: Timers

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        start = time.perf_counter()
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self.timers.add("loss_forward", time.perf_counter() - start)


def time_setting(run: Path, reward_spec, energy_penalty: str, args, out_dir: Path) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())["stages"]["rl"]
    model_dir = run / "sparsify" if (run / "sparsify" / "model.safetensors").is_file() else run / "distill"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_from_disk(str(run / "data" / "prompts"))
    policy = rl.load_policy(model_dir)
    budget = tasks.answer_token_budget(tokenizer, prompts["test"]["answer"])
    timers = Timers()
    funcs, weights = rewards.build_rewards(reward_spec, policy=policy, tokenizer=tokenizer)
    weights, spike_rate_weight = rl.split_energy_weight(funcs, weights, energy_penalty)
    funcs = [timers.wrap(f"reward/{f.__name__}", f) for f in funcs]
    policy.generate = timers.wrap("generation", policy.generate)
    trl_block = dict(recipe["trl"]) | {"max_steps": args.warmup + args.steps, "logging_steps": 1}
    config = trl.GRPOConfig(
        output_dir=str(out_dir), seed=0, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        max_completion_length=budget, reward_weights=weights, **trl_block,
    )
    step_timer = StepTimer(timers, args.warmup)
    trainer = TimedGRPO(
        model=policy, args=config, reward_funcs=funcs, train_dataset=prompts["train"], processing_class=tokenizer,
        callbacks=[step_timer],
    )
    trainer.timers = timers
    rl.with_spike_rate(trainer, spike_rate_weight)
    trainer.train()
    t = timers.totals
    step = t["step"]
    phases = {
        "generation": t.get("generation", 0.0),
        "reward": sum(v for k, v in t.items() if k.startswith("reward/")),
        "loss_forward": t.get("loss_forward", 0.0),
    }
    phases["rest (backward, optimizer, advantages, logging)"] = step - sum(phases.values())
    return {
        "rewards": reward_spec,
        "energy_penalty": energy_penalty,
        "counted_steps": step_timer.steps,
        "seconds_per_step": step / step_timer.steps,
        "seconds_per_step_by_phase": {k: v / step_timer.steps for k, v in phases.items()},
        "share": {k: v / step for k, v in phases.items()},
        "reward_seconds_per_step": {k[len("reward/"):]: v / step_timer.steps for k, v in t.items() if k.startswith("reward/")},
        "grpo": {k: trl_block[k] for k in ("num_generations", "per_device_train_batch_size")} | {"max_completion_length": budget},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "tiny"), help="a finished tiny run (data + sparsify or distill)")
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps timed")
    parser.add_argument("--warmup", type=int, default=2, help="GRPO steps run first and not timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    if not (run / "data" / "prompts").is_dir():
        raise SystemExit(f"{run} has no finished data stage: run bash scripts/quickstart.sh (or spikerl run recipes/tiny.yaml) first")

    settings = {
        "recipe [arith_exact]": (["arith_exact"], "loss"),
        "[arith_exact, {spike_energy: 0.3}], energy_penalty loss": (["arith_exact", {"spike_energy": 0.3}], "loss"),
    }
    rows = {}
    for label, (spec, mode) in settings.items():
        with tempfile.TemporaryDirectory() as out_dir:
            row = time_setting(run, spec, mode, args, Path(out_dir))
        rows[label] = row
        shares = "  ".join(f"{k.split(' ')[0]} {100 * v:5.1f}%" for k, v in row["share"].items())
        print(f"{label}: {row['seconds_per_step']:.3f} s/step  {shares}", flush=True)
    result = {
        "what": "wall time of TRL GRPO steps split by phase (generation, rewards, loss forward, rest), CPU",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "trl": trl.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
