"""The spike-rate loss term: a differentiable count of the neurons' spikes, added to a training loss.

A sequence-level reward (rewards/energy.py `SpikeEnergy`) moves the weights only through the
log-probs of sampled tokens; this term asks the network itself for fewer spikes. It is used by
the rl stage (`{spike_energy: w}`, methods.md §9) and by the sparsify stage (`sbds.energy`,
methods.md §10), which is why it lives with the neurons and not with the rewards: a stage that
uses it depends on the neurons, not on the reward functions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .neurons import iter_neurons


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
        neurons = list(iter_neurons(model))
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
