"""rewards/: the docstring examples (doctest), edge cases, the recipe forms, the checking wrapper
(an error naming the reward), spike_energy against spiking.count_spikes row by row, and the
spike-rate loss term (SpikeRateRegulariser): its value by hand and against count_spikes, a
non-zero gradient that lowers the rate, and a clear error when nothing was recorded.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_rewards.py -q
"""

from __future__ import annotations

import doctest

import pytest
import torch

import rewards
import rewards.energy
import rewards.tasks
import spiking
from rewards import REWARDS, RewardError, build_rewards, checked, parse_spec
from tests.test_ppo import tiny_policy
from tests.test_trl_peft import char_tokenizer


@pytest.mark.parametrize("module", [rewards, rewards.tasks, rewards.energy])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    print(module.__name__, result)
    assert result.failed == 0
    if module is not rewards.energy:
        assert result.attempted > 0


def test_registry_has_the_named_rewards_with_trls_signature():
    assert set(REWARDS) >= {"arith_exact", "math_answer", "format", "length_penalty"}
    for name, func in REWARDS.items():
        out = func(completions=["1", "x"], answer=["1", "2"], prompts=["a", "b"], completion_ids=[[1], [2]], trainer_state=None)
        assert len(out) == 2 and all(v is None or isinstance(v, float) for v in out), name


def test_edge_cases():
    assert REWARDS["arith_exact"]([], answer=[]) == []
    assert REWARDS["arith_exact"](["\n42\n"], answer=[" 42"]) == [1.0]
    assert REWARDS["math_answer"](["-3.50 dollars"], answer=["#### -3.5"]) == [1.0]
    assert REWARDS["math_answer"](["1,000,000"], answer=[1000000]) == [1.0]
    assert REWARDS["math_answer"](["7"], answer=["no number here"]) == [None]
    assert REWARDS["format"]([""]) == [0.0]
    assert REWARDS["length_penalty"]([""]) == [0.0]
    with pytest.raises(ValueError, match="invalid regex"):
        rewards.format_reward("(")


def test_recipe_forms_and_weights():
    assert parse_spec("arith_exact") == [("arith_exact", 1.0, {})]
    assert parse_spec({"arith_exact": 1, "length_penalty": 0.1}) == [("arith_exact", 1.0, {}), ("length_penalty", 0.1, {})]
    funcs, weights = build_rewards([{"format": {"weight": 0.5, "pattern": "^a"}}, "tests.test_rewards.always_one"])
    assert weights == [0.5, 1.0]
    assert [f.__name__ for f in funcs] == ["format", "tests.test_rewards.always_one"]
    assert funcs[0](completions=["ab", "ba"]) == [1.0, 0.0]
    assert funcs[1](completions=["x"]) == [1.0]
    with pytest.raises(ValueError, match="rewards.nope: unknown reward"):
        parse_spec(["nope"])
    with pytest.raises(ValueError, match="arith_exact listed twice"):
        parse_spec(["arith_exact", {"arith_exact": 2}])
    with pytest.raises(ValueError, match="rewards.arith_exact: takes no arguments"):
        parse_spec([{"arith_exact": {"pattern": "x"}}])
    with pytest.raises(ValueError, match="rewards.format: weight must be a number"):
        parse_spec([{"format": "heavy"}])
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_rewards(["tests.test_rewards.missing"])
    with pytest.raises(ValueError, match="cannot import module"):
        build_rewards(["no_such_module.reward"])
    with pytest.raises(ValueError, match="spike_energy: needs the policy"):
        build_rewards([{"spike_energy": 0.1}])


def always_one(completions, **kwargs):
    return [1.0] * len(completions)


def test_a_broken_reward_fails_with_its_name():
    def raises(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"reward 'my_reward' raised KeyError: 'answer'"):
        checked(raises, "my_reward")(completions=["a"])
    with pytest.raises(RewardError, match=r"reward 'short' returned 1 values for 2 completions"):
        checked(lambda completions, **kw: [1.0], "short")(completions=["a", "b"])
    with pytest.raises(RewardError, match=r"reward 'text' returned 'yes' for completion 0"):
        checked(lambda completions, **kw: ["yes"], "text")(completions=["a"])
    with pytest.raises(RewardError, match=r"reward 'nan' returned nan"):
        checked(lambda completions, **kw: [float("nan")], "nan")(completions=["a"])
    with pytest.raises(RewardError, match=r"reward 'scalar' returned float"):
        checked(lambda completions, **kw: 1.0, "scalar")(completions=["a"])
    # a dotted-path user reward is wrapped too
    (func,), _ = build_rewards(["tests.test_rewards.wrong_length"])
    with pytest.raises(RewardError, match=r"reward 'tests.test_rewards.wrong_length' returned 0 values"):
        func(completions=["a"])


def wrong_length(completions, **kwargs):
    return []


# ----------------------------------------------------------------------------- spike_energy


def test_spike_energy_equals_count_spikes_on_each_completion_alone():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    prompts = ["12+34=", "5+6=", "9+99="]
    completions = ["46", "11", ""]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    (energy,), _ = build_rewards([{"spike_energy": 0.1}], policy=policy, tokenizer=tokenizer)
    assert energy.__name__ == "spike_energy"
    values = energy(prompts=prompts, completions=completions, completion_ids=completion_ids)
    assert values[2] is None  # an empty completion has no tokens to count
    for prompt, completion, value in zip(prompts[:2], completion_ids[:2], values[:2]):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] + completion])
        mask = torch.zeros_like(ids)
        mask[:, -len(completion):] = 1
        with torch.no_grad(), spiking.count_spikes(policy, attention_mask=mask) as stats:
            policy(input_ids=ids)
        alone = stats.overall()
        expected = -alone["abs_sum"] / alone["elements"]
        print(value, expected, alone["spikes_per_token"])
        assert value == pytest.approx(expected, rel=1e-6) and value < 0


def test_spike_energy_penalises_more_spikes_more():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    energy = rewards.SpikeEnergy(policy, tokenizer)
    args = dict(prompts=["12+34="], completions=["46"], completion_ids=[tokenizer("46", add_special_tokens=False)["input_ids"]])
    base = energy(**args)[0]
    for _, neuron in spiking.iter_neurons(policy):
        with torch.no_grad():
            neuron.log_V.sub_(1.0)  # thresholds × 0.37: more spikes for the same input
    assert energy(**args)[0] < base


def test_spike_energy_needs_a_spiking_policy():
    tokenizer = char_tokenizer()
    plain = spiking.SpikingMambaForCausalLM(spiking.SpikingMambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=1, neurons={}))
    with pytest.raises(ValueError, match="spike_energy: the policy has no spiking neurons"):
        rewards.SpikeEnergy(plain, tokenizer)


# ----------------------------------------------------------------------------- the spike-rate loss term


def test_surrogate_spike_count_by_hand_for_each_neuron_kind():
    """Value = the neuron's |s| (SI-LIF: round half away, clipped at D; ATMN: trunc, clipped at T);
    gradient = sign(x)/V inside the range, 0 above the top level."""
    si_lif = spiking.make_neuron({"kind": "si_lif", "D": 2}, channels=2)
    atmn = spiking.make_neuron({"kind": "atmn", "T": 3}, channels=2)
    with torch.no_grad():
        si_lif.log_V.copy_(torch.log(torch.tensor([0.5, 2.0])))
        atmn.a.copy_(torch.log(torch.tensor([0.5, 2.0])))
    x = torch.tensor([[0.2, -3.0], [-0.8, 9.0]], requires_grad=True)  # [L=2, C=2]; x/V = [[0.4, -1.5], [-1.6, 4.5]]
    for neuron, counts in ((si_lif, [[0, 2], [2, 2]]), (atmn, [[0, 1], [1, 3]])):
        value = rewards.energy.surrogate_spike_count(neuron, x)
        print(neuron.kind, value.tolist())
        assert value.tolist() == counts
        (grad,) = torch.autograd.grad(value.sum(), x)
        top = neuron.top_level  # D = 2, T = 3
        # d min(|x|/V, top)/dx: sign(x)/V below the top level, 0 above (9/2 = 4.5 > top for both)
        expected = torch.tensor([[1 / 0.5, -1 / 2.0], [-1 / 0.5, 0.0]])
        assert top < 4.5
        torch.testing.assert_close(grad, expected)


def completion_batch(tokenizer):
    """Left-padded prompt + completion rows [B, L] and a mask of the completion tokens."""
    rows = [("12+34=", "46"), ("5+6=", "11"), ("70+8=", "7")]
    batch = tokenizer([p + c for p, c in rows], return_tensors="pt", padding=True)
    completion = torch.zeros_like(batch["input_ids"])
    for i, (_, c) in enumerate(rows):
        completion[i, -len(c):] = 1
    return batch, completion


def test_spike_rate_term_equals_count_spikes_on_the_completion_tokens():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    batch, completion = completion_batch(tokenizer)
    with torch.no_grad(), spiking.count_spikes(policy, attention_mask=completion) as stats:
        policy(**batch)
    expected = stats.overall()["abs_sum"] / stats.overall()["elements"]  # spikes per neuron channel per step
    regulariser = rewards.energy.SpikeRateRegulariser(policy, weight=0.5)
    policy.train()
    with regulariser.recording():
        policy(**batch)
    rate = regulariser.rate(completion)
    print("regulariser", float(rate.detach()), "count_spikes", expected)
    assert float(rate.detach()) == pytest.approx(expected, rel=1e-6) and expected > 0
    assert rate.requires_grad
    with pytest.raises(RuntimeError, match="recorded nothing"):
        with torch.no_grad(), regulariser.recording():
            policy(**batch)  # no gradients: nothing to differentiate, so nothing recorded
        regulariser.rate(completion)
    regulariser.close()
    with regulariser.recording():
        policy(**batch)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        regulariser.rate(completion)  # hooks removed: the model runs as before


def test_spike_rate_gradient_is_nonzero_and_lowers_the_rate():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    batch, completion = completion_batch(tokenizer)
    regulariser = rewards.energy.SpikeRateRegulariser(policy, weight=1.0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-2)
    policy.train()
    rates = []
    for _ in range(6):
        with regulariser.recording():
            policy(**batch)
        rate = regulariser.rate(completion)
        optimizer.zero_grad()
        (regulariser.weight * rate).backward()
        if not rates:
            grads = {n: p.grad.abs().sum().item() for n, p in policy.named_parameters() if p.grad is not None}
            print({n: g for n, g in grads.items() if g > 0})
            assert any(g > 0 for n, g in grads.items() if "neurons" in n)  # the thresholds
            assert any(g > 0 for n, g in grads.items() if "in_proj" in n or "embeddings" in n)  # what feeds them
        optimizer.step()
        rates.append(float(rate.detach()))
    print("rates", rates)
    assert rates[-1] < 0.8 * rates[0]


def test_spike_energy_term_is_the_fan_out_weighted_spike_count_per_token():
    tokenizer = char_tokenizer()
    policy = tiny_policy(tokenizer)
    batch, completion = completion_batch(tokenizer)
    pj = spiking.spike_costs(policy)
    # by hand: each neuron's exact spike count on the completion tokens × what one of its spikes costs
    inputs, handles = {}, []
    for name, neuron in spiking.iter_neurons(policy):
        handles.append(neuron.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0])))
    with torch.no_grad():
        policy.eval()(**batch)
    for h in handles:
        h.remove()
    modules = dict(policy.named_modules())
    expected = 0.0
    for name, x in inputs.items():
        counts = modules[name].spike_counts(x).abs()
        per_token = counts.sum(0) if counts.dim() == x.dim() + 1 else counts  # ATMN: summed over steps
        expected += float((per_token.sum(-1) * completion).sum()) * pj[name]
    expected /= float(completion.sum())
    regulariser = rewards.energy.SpikeRateRegulariser(policy, weight=1.0)
    policy.train()
    with regulariser.recording():
        policy(**batch)
    energy = regulariser.energy(completion, pj)
    print("spike-driven pJ per token", float(energy.detach()), "by hand", expected)
    assert float(energy.detach()) == pytest.approx(expected, rel=1e-6) and expected > 0 and energy.requires_grad


def test_arith_digits_gives_partial_credit_by_place():
    """Hand-computed: places aligned from the units, over the longer number; exact = 1 like arith_exact."""
    scores = REWARDS["arith_digits"](
        ["1089", "1189", "189", "10890", " 82 ", "-82", "", "82"],
        answer=["1089", "1089", "1089", "1089", "82", "82", "82", None],
    )
    assert scores == [1.0, 0.75, 0.5, 0.0, 1.0, 0.0, 0.0, None]
    exact = REWARDS["arith_exact"](["1089", " 82 "], answer=["1089", "82"])
    assert exact == scores[:1] + scores[4:5]
