"""The energy-aware reward (methods.md §9): a penalty on the completion's spikes under the policy.

Two halves, both weighted by the recipe's `{spike_energy: w}` (stages/rl.py, `energy_penalty`):

* `SpikeEnergy`: the sequence-level reward below (one number per completion). GRPO / RLOO / PPO
  see it only through the log-probs of the sampled tokens: it prefers samples that happened to
  spike less, but cannot push the weights toward fewer spikes. Measured on runs/tiny it did not
  lower the firing rate at any weight; the stage logs it (weight 0 in the advantages) by default.
* `SpikeRateRegulariser`: the differentiable path, `w × spike rate` of the completion tokens in
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

from contextlib import ExitStack, contextmanager

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


# ----------------------------------------------------------------------------- the loss term


def surrogate_spike_count(neuron: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|s| per element of `neuron`'s input x [..., C], differentiable: value exact, gradient smooth.

    Value: the neuron's own spike count per (token, channel), summed over its steps (SI-LIF
    `|s| ∈ 0..D`; ATMN `Σ_t |s_t| ∈ 0..T`), from `neuron.spike_counts`. Gradient: straight
    through `min(|x| / V_th, top)` (top = D or T), i.e. `sign(x)/V_th` for x, `-|x|/V_th²` for the
    threshold, zero above the top level, where a smaller input would not remove a spike. Computed
    in float32. Returns [..., C].
    """
    V = neuron.threshold().float()  # detached by the neuron itself when the threshold is frozen
    soft = (x.float().abs() / V).clamp(max=float(neuron.top_level))
    with torch.no_grad():
        counts = neuron.spike_counts(x.detach()).abs().float()
        if counts.dim() == x.dim() + 1:  # ATMN: the ternary train [T, ..., C] -> spikes per element
            counts = counts.sum(0)
    return soft + (counts - soft).detach()


class SpikeRateRegulariser:
    """The differentiable path of `spike_energy`: `weight × spike rate` added to a policy loss.

    A sequence-level reward only moves the weights through the log-probs of sampled tokens; it
    cannot ask the network for fewer spikes. This term can: during the loss's own forward it
    collects every neuron's input x [B, L, C] (a forward pre-hook) and returns, over the chosen
    tokens (the completions),

        rate = Σ_neurons Σ_tokens Σ_channels surrogate |s|  /  Σ_neurons (tokens · C · steps)

    the same figure as `SpikeStats.mean_abs` on those tokens (spikes per neuron channel per step;
    what the `spike_energy` reward returns, negated, per completion), with the gradient of
    `surrogate_spike_count`. Use:

        regulariser = SpikeRateRegulariser(policy, weight=0.5)
        with regulariser.recording():
            logits = policy(input_ids=ids, attention_mask=attn).logits     # the loss's forward
        loss = policy_loss + regulariser.weight * regulariser.rate(token_mask)   # token_mask [B, L]

    The hooks stay registered (`close()` removes them) and compute the surrogate in every forward
    that runs in training mode with gradients on, but keep it only inside `recording()`. That is
    what makes gradient checkpointing (non-reentrant, TRL's default) work: the recompute in
    backward runs the same operations and its values are not counted twice. Forwards in eval mode
    or under no_grad (generation, old log-probs, evaluation) cost nothing.
    """

    def __init__(self, model: torch.nn.Module, weight: float):
        if weight < 0:
            raise ValueError(f"spike_energy: weight must be >= 0, got {weight}")
        neurons = list(spiking.iter_neurons(model))
        if not neurons:
            raise ValueError("spike_energy: the policy has no spiking neurons (nothing to penalise)")
        self.weight = float(weight)
        self._recording = False
        self._counts: dict[str, list[torch.Tensor]] = {name: [] for name, _ in neurons}
        # elements per token: channels × steps (ATMN counts its T steps, as SpikeStats does)
        self._per_token = {name: n.channels * getattr(n, "T", 1) for name, n in neurons}
        self._handles = [n.register_forward_pre_hook(self._hook(name)) for name, n in neurons]

    def _hook(self, name: str):
        def hook(neuron, args):
            if not (neuron.training and torch.is_grad_enabled()):
                return
            per_token = surrogate_spike_count(neuron, args[0]).sum(-1)  # [B, L]
            if self._recording:
                self._counts[name].append(per_token)

        return hook

    @contextmanager
    def recording(self):
        """Keep the spike counts of the forwards run inside the block (earlier ones are dropped)."""
        for chunks in self._counts.values():
            chunks.clear()
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def rate(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Spikes per neuron channel per step on the tokens where `token_mask [B, L]` is 1 (scalar, differentiable).

        The recorded forwards' rows, in order, must make up the B rows of the mask (a trainer
        that splits the batch into chunks runs them in order). Frees the recorded tensors.
        """
        total = elements = 0
        for name, chunks in self._counts.items():
            if not chunks:
                raise RuntimeError(
                    f"spike_energy: neuron {name!r} recorded nothing in the loss's forward (the forward ran in "
                    "eval mode or without gradients: with gradient checkpointing use use_reentrant: false)"
                )
            counts = torch.cat(chunks, dim=0)
            if counts.shape != token_mask.shape:
                raise ValueError(f"spike_energy: token_mask {tuple(token_mask.shape)} does not match the forward's tokens {tuple(counts.shape)}")
            mask = token_mask.to(device=counts.device, dtype=counts.dtype)
            total = total + (counts * mask).sum()
            elements = elements + mask.sum() * self._per_token[name]
            chunks.clear()
        return total / elements.clamp(min=1)

    def energy(self, token_mask: torch.Tensor, pj_per_spike: dict[str, float]) -> torch.Tensor:
        """pJ per token of the spike-driven ACs on the tokens where `token_mask [B, L]` is 1
        (scalar, differentiable): each neuron's surrogate spike count × what one of its spikes
        costs downstream (`spiking.spike_costs`), summed over neurons, averaged over tokens. The
        spike-rate term weighs every spike alike; this one weighs it by its fan-out (an in_proj
        spike costs 2E ACs, an x_proj spike R + 2N). Frees the recorded tensors."""
        total = 0
        tokens = token_mask.sum().clamp(min=1)
        for name, chunks in self._counts.items():
            if not chunks:
                raise RuntimeError(f"spike energy: neuron {name!r} recorded nothing in the loss's forward")
            counts = torch.cat(chunks, dim=0)
            mask = token_mask.to(device=counts.device, dtype=counts.dtype)
            total = total + (counts * mask).sum() * pj_per_spike[name]
            chunks.clear()
        return total / tokens.to(total.device if isinstance(total, torch.Tensor) else "cpu")

    def close(self) -> None:
        """Remove the hooks (the model runs as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
