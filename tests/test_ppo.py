"""The project's PPO trainer: GAE and the clipped losses against hand-computed values, a toy
problem with a known optimum, the separate value model, checkpoint contents, and the spike-rate
loss term (spike_rate_weight) lowering the policy's firing rate.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_ppo.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

import spiking
from stages.ppo import PPOConfig, PPOTrainer, gae, masked_whiten, ppo_losses
from tests.test_trl_peft import char_tokenizer


def tiny_policy(tokenizer, seed: int = 0) -> spiking.SpikingMambaForCausalLM:
    torch.manual_seed(seed)
    config = spiking.SpikingMambaConfig(
        vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        neurons=spiking.default_neurons(D=4),
    )
    model = spiking.SpikingMambaForCausalLM(config)
    spiking.calibrate(model, [tokenizer(["12+34=", "5+6="], return_tensors="pt", padding=True)])
    return model


def starts_with_seven(completions, **kwargs):
    return [float(c.startswith("7")) for c in completions]


PROMPTS = Dataset.from_dict({"prompt": ["12+34=", "5+6=", "70+8=", "9+99="]})


# ----------------------------------------------------------------------------- the maths, by hand


def test_gae_equals_hand_computed_values():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # row 2: the third token is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 1: δ2 = 1 - 0.3 = 0.7; δ1 = 0 + 0.9·0.3 - 0.2 = 0.07; δ0 = 0 + 0.9·0.2 - 0.1 = 0.08
    a2 = 0.7
    a1 = 0.07 + gamma * lam * a2
    a0 = 0.08 + gamma * lam * a1
    # row 2: the last real token has no successor (V of padding ignored): δ1 = 2 - 0.5 = 1.5;
    # δ0 = 0.5 + 0.9·0.5 - 0.4 = 0.55
    b1 = 1.5
    b0 = 0.55 + gamma * lam * b1
    expected = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    print("GAE", advantages.tolist(), "hand", expected.tolist())
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, -0.5, 0.25]])
    mask = torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    discounted = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]])
    torch.testing.assert_close(returns, discounted)
    torch.testing.assert_close(advantages, discounted - values)


def test_clipped_losses_equal_hand_computed_values():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = ppo_losses(new, old, adv, values, old_values, returns, mask, clip_range=0.2, clip_range_value=0.2)
    # token 1: max(-1·1.5, -1·1.2) = -1.2; token 2: max(1·0.5, 1·0.8) = 0.8 -> mean -0.2
    assert out["pg_loss"].item() == pytest.approx(-0.2)
    # token 1: max((1-0)², (0.2-0)²) = 1; token 2: max((0-1)², (0-1)²) = 1 -> ½·mean = 0.5
    assert out["vf_loss"].item() == pytest.approx(0.5)
    assert out["clipfrac"].item() == pytest.approx(1.0)


def test_whitening_uses_only_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- training


def test_toy_problem_reaches_the_known_optimum(tmp_path):
    """Reward 1 iff the completion starts with '7' (1 of 14 tokens at first): PPO must find it."""
    tokenizer = char_tokenizer()
    args = PPOConfig(max_steps=30, batch_size=4, num_generations=4, mini_batch_size=8, ppo_epochs=4, learning_rate=3e-2,
                     max_completion_length=1, kl_coef=0.0, logging_steps=5, save_steps=1000)
    trainer = PPOTrainer(tiny_policy(tokenizer), None, tokenizer, [starts_with_seven], [1.0], PROMPTS, args, tmp_path)
    history = trainer.train()["log_history"]
    print([(h["step"], h["reward"]) for h in history])
    assert history[0]["reward"] < 0.6
    assert history[-1]["reward"] > 0.9


def test_kl_penalty_and_separate_value_model_train(tmp_path):
    tokenizer = char_tokenizer()
    policy, ref, value = tiny_policy(tokenizer), tiny_policy(tokenizer), tiny_policy(tokenizer)
    value_before = {k: v.clone() for k, v in value.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    args = PPOConfig(max_steps=2, batch_size=4, num_generations=2, mini_batch_size=4, ppo_epochs=2, learning_rate=5e-2,
                     max_completion_length=3, kl_coef=0.1, value_model="separate", logging_steps=1, save_steps=2)
    trainer = PPOTrainer(policy, ref, tokenizer, [starts_with_seven], [1.0], PROMPTS, args, tmp_path, value_backbone=value)
    history = trainer.train()["log_history"]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert history[-1]["kl"] != 0.0
    assert any(not torch.equal(value_before[k], v) for k, v in value.state_dict().items())
    assert any(not torch.equal(policy_before[k], v) for k, v in policy.state_dict().items())
    folder = tmp_path / "checkpoint-2"
    assert {p.name for p in folder.iterdir()} >= {"policy.safetensors", "value.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 2


def test_bad_inputs_are_clear_errors(tmp_path):
    tokenizer = char_tokenizer()
    args = PPOConfig(max_completion_length=2)
    with pytest.raises(ValueError, match="kl_coef > 0 needs a reference model"):
        PPOTrainer(tiny_policy(tokenizer), None, tokenizer, [starts_with_seven], [1.0], PROMPTS, args, tmp_path)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        PPOTrainer(tiny_policy(tokenizer), None, tokenizer, [starts_with_seven], [1.0], Dataset.from_dict({"q": ["1"]}), args.model_copy(update={"kl_coef": 0.0}), tmp_path)


def completion_spike_rate(policy, tokenizer) -> float:
    """Spikes per neuron channel per step of the policy on fixed prompt + completion texts (all tokens)."""
    batch = tokenizer(["12+34=46", "5+6=11", "70+8=78"], return_tensors="pt", padding=True)
    with torch.no_grad(), spiking.count_spikes(policy, attention_mask=batch["attention_mask"]) as stats:
        policy.eval()(**batch)
    return stats.mean_abs


def test_spike_rate_term_lowers_the_firing_rate(tmp_path):
    tokenizer = char_tokenizer()
    args = PPOConfig(max_steps=3, batch_size=4, num_generations=2, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-2,
                     max_completion_length=3, kl_coef=0.0, logging_steps=1, save_steps=10)
    rates = {}
    for weight in (0.0, 5.0):
        policy = tiny_policy(tokenizer)
        trainer = PPOTrainer(policy, None, tokenizer, [starts_with_seven], [1.0], PROMPTS, args, tmp_path / str(weight),
                             spike_rate_weight=weight)
        history = trainer.train()["log_history"]
        rates[weight] = completion_spike_rate(policy, tokenizer)
        logged = [entry.get("spike_rate") for entry in history]
        print(weight, rates[weight], logged)
        assert all(v is not None and v > 0 for v in logged) if weight else all(v is None for v in logged)
    start = completion_spike_rate(tiny_policy(tokenizer), tokenizer)
    assert rates[5.0] < 0.9 * start and rates[5.0] < rates[0.0]
