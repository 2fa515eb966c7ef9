"""The rl stage: GRPO, RLOO, DPO and PPO each train a tiny spiking student for 2 steps on CPU
(weights move, metrics before/after, a loadable output), LoRA merged or saved as an adapter, the
`trl:` block checked against TRL's config, DPO pairs built from the verifiable task, resume
after a crash, and the spike_energy loss term inside TRL's GRPO loss (weight 0: TRL's loss
exactly; weight w: TRL's loss + w × the completions' spike rate) and PPO's.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_rl.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from pydantic import ValidationError
import trl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import rewards
import spiking
from stages import data, rl
from stages.context import ModelConfig, StageContext
from tests.test_teacher_stage import CrashAfterSave

TINY_TRL = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 4,
            "learning_rate": 5e-2, "logging_steps": 1, "save_steps": 1}
TINY_DPO = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-2, "logging_steps": 1, "save_steps": 1}
TINY_PPO = {"max_steps": 2, "batch_size": 4, "num_generations": 2, "mini_batch_size": 4, "ppo_epochs": 2,
            "learning_rate": 5e-2, "max_completion_length": 4, "logging_steps": 1, "save_steps": 1}


def make_ctx(root: Path, stage: str, upstream: dict[str, Path], seed: int = 0) -> StageContext:
    out = root / stage
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage, run_dir=root, out_dir=out, upstream=upstream, model=ModelConfig(), seed=seed)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, Path]:
    """A data stage run and a tiny spiking student saved as the distill stage saves one."""
    root = tmp_path_factory.mktemp("run")
    ctx = make_ctx(root, "data", {})
    data.run(data.Config(source={"synthetic": "arithmetic", "digits": [1], "num_problems": 100}, test_size=12, rl_prompts=16, seq_len=12), ctx)
    tokenizer = AutoTokenizer.from_pretrained(ctx.out_dir / "tokenizer")
    torch.manual_seed(0)
    config = spiking.SpikingMambaConfig(
        vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        neurons=spiking.default_neurons(D=4),
    )
    student = spiking.SpikingMambaForCausalLM(config)
    spiking.calibrate(student, [tokenizer(["1+2=3", "4+5=9"], return_tensors="pt", padding=True)])
    distill_dir = root / "distill"
    student.save_pretrained(distill_dir)
    tokenizer.save_pretrained(distill_dir)
    return {"data": ctx.out_dir, "distill": distill_dir}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def moved(before: dict, after: dict) -> list[str]:
    return [k for k in before if k in after and not torch.equal(before[k], after[k])]


# ----------------------------------------------------------------------------- config


def test_config_checks_trl_keys_against_the_algorithms_config():
    assert rl.Config(algo="grpo", trl={"num_generations": 4, "beta": 0.1}).trl["beta"] == 0.1
    with pytest.raises(ValidationError, match=r"trl\.num_generatons: not a field of trl\.GRPOConfig"):
        rl.Config(algo="grpo", trl={"num_generatons": 4})
    with pytest.raises(ValidationError, match=r"trl\.num_generations: not a field of trl\.DPOConfig"):
        rl.Config(algo="dpo", trl={"num_generations": 4})  # a GRPO knob DPO does not have
    with pytest.raises(ValidationError, match=r"trl\.reward_weights: give weights in stages\.rl\.rewards"):
        rl.Config(algo="rloo", trl={"reward_weights": [1.0]})
    with pytest.raises(ValidationError, match=r"trl\.output_dir"):
        rl.Config(trl={"output_dir": "/tmp/x"})
    with pytest.raises(ValidationError, match=r"stages\.rl\.ppo"):
        rl.Config(algo="ppo", trl={"max_steps": 3})
    with pytest.raises(ValidationError, match="rewards.arith_exakt: unknown reward"):
        rl.Config(rewards=["arith_exakt"])
    with pytest.raises(ValidationError, match="ppo_epochs"):
        rl.Config(algo="ppo", ppo={"ppo_epochs": 0})


# ----------------------------------------------------------------------------- each algorithm


@pytest.mark.parametrize(
    "algo, section",
    [
        ("grpo", {"trl": TINY_TRL | {"beta": 0.1}}),
        ("rloo", {"trl": TINY_TRL}),
        ("dpo", {"trl": TINY_DPO, "dpo": {"samples_per_prompt": 6}}),
        ("ppo", {"ppo": TINY_PPO}),
    ],
)
def test_each_algorithm_trains_the_spiking_policy_two_steps(tmp_path, upstream, algo, section):
    ctx = make_ctx(tmp_path, "rl", upstream)
    cfg = rl.Config(algo=algo, rewards=["arith_exact", {"length_penalty": 0.5}], eval_samples=8, **section)
    metrics = rl.run(cfg, ctx)
    print(algo, metrics)
    assert metrics["steps"] == 2
    for key in ("accuracy_before", "accuracy_after", "firing_rate_before", "firing_rate_after"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["spikes_per_token_before"] > 0 and metrics["spikes_per_token_after"] > 0
    assert metrics["energy_pj_per_token_before"] > 0 and metrics["energy_pj_per_token_after"] > 0
    assert "energy_ratio_after" not in metrics  # this run has no teacher stage to compare with
    changed = moved(weights(upstream["distill"]), weights(ctx.out_dir))
    assert any(".mixer.in_proj." in k for k in changed), changed
    policy = AutoModelForCausalLM.from_pretrained(ctx.out_dir)
    assert isinstance(policy, spiking.SpikingMambaForCausalLM)
    assert all(n.sgc_lambda == 0.0 for _, n in spiking.iter_neurons(policy))
    assert (ctx.out_dir / "tokenizer_config.json").is_file()
    assert json.loads((ctx.out_dir / "train_log.json").read_text())
    if algo == "dpo":
        assert metrics["dpo_pairs"] > 0


def test_the_input_model_is_sparsify_when_the_recipe_has_it(tmp_path, upstream):
    ctx = make_ctx(tmp_path, "rl", {**upstream, "sparsify": upstream["distill"]})
    assert rl.input_model_dir(ctx) == upstream["distill"]
    ctx = make_ctx(tmp_path, "rl", {"data": upstream["data"]})
    with pytest.raises(ValueError, match="needs the output of stage 'distill'"):
        rl.run(rl.Config(), ctx)


@pytest.mark.parametrize("algo, merge", [("grpo", True), ("grpo", False), ("ppo", True)])
def test_lora_is_merged_or_saved_as_an_adapter(tmp_path, upstream, algo, merge):
    ctx = make_ctx(tmp_path, "rl", upstream)
    section = {"trl": TINY_TRL} if algo == "grpo" else {"ppo": TINY_PPO}
    cfg = rl.Config(algo=algo, lora={"r": 2, "alpha": 4, "merge": merge}, eval_samples=4, rewards=["length_penalty"], **section)
    rl.run(cfg, ctx)
    if merge:
        after = weights(ctx.out_dir)
        assert not any("lora_" in k for k in after)
        changed = moved(weights(upstream["distill"]), after)
        assert changed and all(k.split(".")[-2] in ("in_proj", "x_proj", "dt_proj") for k in changed), changed
    else:
        assert (ctx.out_dir / "adapter_config.json").is_file() and not (ctx.out_dir / "model.safetensors").exists()
        adapter = load_file(str(ctx.out_dir / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)


@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_spike_energy_runs_inside_grpo(tmp_path, upstream, mode):
    """TRL's default gradient checkpointing (non-reentrant) is on here: the loss term works with it."""
    ctx = make_ctx(tmp_path, "rl", upstream)
    cfg = rl.Config(algo="grpo", trl=TINY_TRL, rewards=["arith_exact", {"spike_energy": 0.5}], energy_penalty=mode, eval_samples=4)
    metrics = rl.run(cfg, ctx)
    log = json.loads((ctx.out_dir / "train_log.json").read_text())
    energy = [entry["rewards/spike_energy/mean"] for entry in log if "rewards/spike_energy/mean" in entry]
    rates = [entry["spike_energy/rate"] for entry in log if "spike_energy/rate" in entry]
    print(mode, energy, rates, metrics)
    assert energy and all(value < 0 for value in energy)  # the reward is computed and logged either way
    assert metrics["spike_rate_weight"] == (0.5 if mode == "loss" else 0.0)
    assert (len(rates) == 2 and all(0 < r for r in rates)) if mode == "loss" else not rates


def test_energy_penalty_loss_needs_an_online_algorithm():
    with pytest.raises(ValidationError, match="energy_penalty: loss needs an online algorithm"):
        rl.Config(algo="dpo", rewards=["arith_exact", {"spike_energy": 0.1}])
    assert rl.Config(algo="dpo", rewards=["arith_exact", {"spike_energy": 0.1}], energy_penalty="reward")
    funcs, weights_ = rewards.build_rewards(["arith_exact", {"length_penalty": 0.5}])
    assert rl.split_energy_weight(funcs, weights_, "loss") == ([1.0, 0.5], 0.0)


class LossProbe(rl.GRPOWithSpikeRate):
    """Computes TRL's own GRPO loss on the same inputs next to the regularised one, each step."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = trl.GRPOTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        total = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        rate = self._spike_rates()[-1] if self.spike_regulariser is not None else None
        self.seen.append((plain.detach(), total.detach(), rate))
        return total


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_grpo_loss_with_the_spike_term_is_trls_loss_plus_weight_times_rate(tmp_path, upstream, weight):
    tokenizer = AutoTokenizer.from_pretrained(upstream["distill"])
    policy = rl.load_policy(upstream["distill"])
    prompts = load_from_disk(str(upstream["data"] / "prompts"))["train"]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        gradient_accumulation_steps=2, **(TINY_TRL | {"save_steps": 10}),
    )
    trainer = LossProbe(model=policy, args=args, reward_funcs=[rewards.REWARDS["arith_exact"]], train_dataset=prompts, processing_class=tokenizer)
    trainer.seen = []
    rl.with_spike_rate(trainer, weight)
    trainer.train()
    assert len(trainer.seen) == 4  # 2 steps × 2 accumulated micro-batches
    for plain, total, rate in trainer.seen:
        print(weight, float(plain), float(total), rate)
        if weight == 0:
            assert torch.equal(plain, total)  # exactly TRL's loss: no hooks, no term
        else:
            assert 0 < rate <= 4  # spikes per neuron channel: SI-LIF D = 4 at most
            torch.testing.assert_close(total, plain + weight * rate / 2, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- DPO pairs


def test_dpo_pairs_from_samples_pair_a_rewarded_with_an_unrewarded_answer(upstream):
    tokenizer = AutoTokenizer.from_pretrained(upstream["distill"])
    policy = rl.load_policy(upstream["distill"])
    prompts = load_from_disk(str(upstream["data"] / "prompts"))["train"]

    def even_length(completions, **kwargs):  # some samples get 1, some 0
        return [float(len(c) % 2 == 0) for c in completions]

    funcs, weights_ = rewards.build_rewards(["tests.test_rl.even_length_reward"])
    torch.manual_seed(0)
    pairs = rl.sample_preference_pairs(policy, tokenizer, prompts, funcs, weights_, rl.DPOPairs(samples_per_prompt=4), 4)
    print(pairs.to_dict())
    assert 0 < len(pairs) <= len(prompts)
    assert all(even_length([c])[0] == 1.0 for c in pairs["chosen"])
    assert all(even_length([r])[0] == 0.0 for r in pairs["rejected"])
    assert set(pairs["prompt"]) <= set(prompts["prompt"])

    always, w = rewards.build_rewards([{"length_penalty": {"max_chars": 10**6, "weight": 0.0}}])
    assert len(rl.sample_preference_pairs(policy, tokenizer, prompts, always, w, rl.DPOPairs(), 4)) == 0


def even_length_reward(completions, **kwargs):
    """For the DPO pair test, loaded through a dotted path like a user's reward."""
    return [float(len(c) % 2 == 0) for c in completions]


def test_dpo_uses_the_data_stages_preference_pairs_when_present(tmp_path, upstream):
    from datasets import Dataset

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "prompts").symlink_to(upstream["data"] / "prompts")
    Dataset.from_dict({"prompt": ["1+2=", "3+4="], "chosen": ["3", "7"], "rejected": ["4", "8"]}).save_to_disk(str(data_dir / "preferences"))
    ctx = make_ctx(tmp_path, "rl", {"data": data_dir, "distill": upstream["distill"]})
    metrics = rl.run(rl.Config(algo="dpo", trl=TINY_DPO | {"per_device_train_batch_size": 2}, eval_samples=4), ctx)
    assert metrics["dpo_pairs"] == 2


# ----------------------------------------------------------------------------- resume


class StepCounter(TrainerCallback):
    """Counts the optimizer steps an attempt runs (a resumed attempt runs only the missing ones)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("algo, section", [("grpo", {"trl": TINY_TRL}), ("ppo", {"ppo": TINY_PPO})])
def test_resume_after_a_crash_gives_the_same_policy(tmp_path, upstream, algo, section):
    cfg = rl.Config(algo=algo, eval_samples=4, rewards=["arith_exact", {"length_penalty": 0.5}], **section)
    straight = make_ctx(tmp_path / "a", "rl", upstream)
    rl.run(cfg, straight)

    crashed = make_ctx(tmp_path / "b", "rl", upstream)
    crashed.extra["callbacks"] = [CrashAfterSave(1)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        rl.run(cfg, crashed)
    assert crashed.last_checkpoint().name == "checkpoint-1"
    counter = StepCounter()
    crashed.extra["callbacks"] = [counter]
    metrics = rl.run(cfg, crashed)  # resumes from checkpoint-1
    assert metrics["steps"] == 2 and counter.steps == 1  # resumed, not restarted
    a, b = weights(straight.out_dir), weights(crashed.out_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
