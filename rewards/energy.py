"""The energy-aware reward (methods.md §9): a penalty on the completion's spikes under the policy.

Two halves, both weighted by the recipe's `{spike_energy: w}` (stages/rl.py, `energy_penalty`):

* `SpikeEnergy`: the sequence-level reward below (one number per completion). GRPO / RLOO / PPO
  see it only through the log-probs of the sampled tokens: it prefers samples that happened to
  spike less, but cannot push the weights toward fewer spikes. Measured on runs/tiny it did not
  lower the firing rate at any weight; the stage logs it (weight 0 in the advantages) by default.
* `SpikeRateRegulariser` (spiking/regulariser.py, shared with the sparsify stage): the differentiable path, `w × spike rate` of the completion tokens in
  the loss's own forward, with a straight-through gradient (`surrogate_spike_count`). This is
  what lowers the firing rate.

`SpikeEnergy(policy, tokenizer)` is a callable with TRL's reward signature. For a batch it runs
ONE extra no-grad forward of prompt + completion through the policy (left-padded, the spiking
model ignores padded positions) inside `spiking.count_spikes`, counting only the completion's
tokens (an attention mask over the completion), and returns per completion

    reward = -(Σ over every neuron of |s| on the completion's tokens) / (tokens · neuron channels)

i.e. minus the spikes per token (`stats.spikes_per_token`) divided by a constant, the number of
neuron channels a token passes (for ATMN the T steps are counted, as in `SpikeStats.mean_abs`),
so the same weight means the same trade-off on a tiny and a large model. 0 = no spike at all;
SI-LIF with D levels bottoms out at -D.

Cost: one forward of the batch (prompt + completion tokens) per reward call, plus, because
`count_spikes` reports totals, one masked reduction per completion and neuron (the batch's
completions are counted by nested `count_spikes` contexts, one per row, all in that single forward).

    energy = SpikeEnergy(model, tokenizer)        # then: GRPOTrainer(reward_funcs=[..., energy])
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

import spiking


class SpikeEnergy:
    """Callable reward: minus the completion's spikes per token per neuron channel, under `policy`.

    A plain class (not an nn.Module: TRL would take a module for a reward *model*) with a
    `__name__`, which TRL uses to log the reward. The policy is the trained model itself, so the
    penalty follows its current weights.
    """

    __name__ = "spike_energy"

    def __init__(self, policy: torch.nn.Module, tokenizer, batch_size: int = 64):
        if not any(True for _ in spiking.iter_neurons(policy)):
            raise ValueError("spike_energy: the policy has no spiking neurons (nothing to penalise)")
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        """prompts: texts; completion_ids: token ids per completion (re-tokenised from text if absent)."""
        if completion_ids is None:
            completion_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        rewards: list[float | None] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            end = start + self.batch_size
            rewards += self._batch(prompt_ids[start:end], [list(c) for c in completion_ids[start:end]])
        return rewards

    @torch.no_grad()
    def _batch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float | None]:
        per_token = spikes_per_completion_token(self.policy, prompt_ids, completion_ids, self.tokenizer.pad_token_id)
        return [None if value is None else -value for value in per_token]


def spikes_per_completion_token(
    model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int
) -> list[float | None]:
    """Per row: Σ|s| over every neuron on the completion's tokens / (tokens · neuron channels).

    One forward of the left-padded rows `[B, L]` (L = longest prompt + completion); row i is
    counted by its own `count_spikes` context whose mask keeps only its completion tokens. None for
    an empty completion (no token, no figure).
    """
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(r) for r in rows)
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (row, completion) in enumerate(zip(rows, completion_ids)):
        input_ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, length - len(row):] = 1
        if completion:
            completion_mask[i, length - len(completion):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    was_training = model.training
    model.eval()  # no dropout, no threshold adaptation, no gradient-checkpoint recompute (counts twice)
    try:
        with ExitStack() as stack:
            per_row = []
            for i in range(len(rows)):
                only_row_i = torch.zeros_like(completion_mask)
                only_row_i[i] = completion_mask[i]
                per_row.append(stack.enter_context(spiking.count_spikes(model, attention_mask=only_row_i.to(device))))
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        model.train(was_training)
    return [stats.mean_abs if stats.overall()["tokens"] else None for stats in per_row]


# The loss term (`surrogate_spike_count`, `SpikeRateRegulariser`) is a fact about the model's neurons,
# used by the sparsify stage too: it lives in spiking/regulariser.py, re-exported here for the rl side.
from spiking.regulariser import SpikeRateRegulariser, surrogate_spike_count  # noqa: E402,F401
