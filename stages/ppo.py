"""PPO for the spiking policy: the project's own trainer (TRL 1.16 has no PPOTrainer).

Used by the rl stage (`stages.rl: {algo: ppo, ppo: {...}}`); also usable alone:

    trainer = PPOTrainer(policy, ref_model, tokenizer, reward_funcs, reward_weights, prompts_ds, PPOConfig(), out_dir)
    trainer.train(resume_from_checkpoint=None)

One PPO step (methods.md §9, the classic RLHF recipe):

1. Rollout: `batch_size` prompts × `num_generations` completions sampled with the policy's
   recurrent generation (`model.generate`, one token at a time with the cache).
2. Score: the reward functions (TRL's interface: `f(prompts=, completions=, completion_ids=,
   **columns) -> list[float | None]`), weighted and summed (None counts 0, as in TRL).
3. Old log-probs, values and reference log-probs of the completion tokens (no grad). Per-token
   reward r_t = -kl_coef · (log π(a_t) - log π_ref(a_t)), plus the score on the last token.
4. GAE:  δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1}  (V and A are 0 past the last
   token), returns R_t = A_t + V_t; advantages whitened over the batch's tokens.
5. `ppo_epochs` passes over shuffled mini-batches of the rollouts:
       L_pg = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),   ρ_t = exp(log π - log π_old)
       L_vf = ½ mean_t max((V_t - R_t)², (V_old + clip(V_t - V_old, ±ε_v) - R_t)²)
       L = L_pg + vf_coef · L_vf + w_spike · rate
   Means are over completion tokens of the mini-batch. `rate` (only with `spike_rate_weight` w_spike
   > 0, the rl stage's `{spike_energy: w}`): the policy's spikes per neuron channel per step on
   those tokens, differentiable (spiking/regulariser.py `SpikeRateRegulariser`).

Value function: a linear head on the policy's final hidden states (`value_model: head`, shares
the trunk, so the value loss also shapes it: keep vf_coef small) or a separate copy of the
reference model's backbone with its own head (`value_model: separate`: twice the memory, no
interference with the policy).

Checkpoints `checkpoint-N/` (like HF Trainer's, so `StageContext.last_checkpoint` finds them):
policy.safetensors, value.safetensors, optimizer.pt, scheduler.pt, rng_state.pth and, written
last, trainer_state.json (step, log history). Resume restores all of it; the prompt order is a
function of (seed, step), so a resumed run continues with the same prompts and, on one process,
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field
from safetensors.torch import load_model, save_model
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_pt_utils import safe_globals

import rewards as rewards_lib
from spiking.regulariser import SpikeRateRegulariser
from stages.context import StrictModel, checkpoint_folders
from stages.tasks import eval_mode, left_padded


class PPOConfig(StrictModel):
    """`stages.rl.ppo:` recipe section (only read when `algo: ppo`)."""

    max_steps: int = Field(100, ge=1, description="PPO steps: one rollout batch + ppo_epochs of updates each")
    batch_size: int = Field(16, ge=1, description="prompts per rollout batch (per process)")
    num_generations: int = Field(1, ge=1, description="completions sampled per prompt")
    mini_batch_size: int = Field(8, ge=1, description="rollouts per optimizer step inside a PPO epoch")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch: more = more sample reuse, staler data")
    learning_rate: float = Field(1e-5, gt=0, description="policy (and value head) learning rate")
    value_learning_rate: float | None = Field(None, gt=0, description="value function learning rate (None: learning_rate)")
    lr_scheduler: Literal["constant", "linear"] = Field("constant", description="linear: decays to 0 at max_steps")
    max_completion_length: int | None = Field(None, ge=1, description="new tokens per rollout (None: the task's answer budget)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (log-probs use the same)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount γ (1: episodic task, reward at the end)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ: 1 = Monte-Carlo returns, 0 = one-step TD")
    clip_range: float = Field(0.2, gt=0, description="ε of the clipped ratio")
    clip_range_value: float = Field(0.2, gt=0, description="ε_v of the clipped value loss")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty to the reference, in the per-token reward (0: no reference)")
    whiten_advantages: bool = Field(True, description="normalise advantages to mean 0, std 1 per batch")
    value_model: Literal["head", "separate"] = Field("head", description="head: on the policy's hidden states; separate: own backbone")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume point)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk")
    logging_steps: int = Field(10, ge=1, description="log rewards and losses every N steps")


# ----------------------------------------------------------------------------- the maths


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (same shape); 0 if the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries set to 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over completion tokens.

    rewards, values, mask: [B, C] (mask: 1 on the completion's tokens, a prefix of each row).
    δ_t = r_t + γ V_{t+1} m_{t+1} - V_t;  A_t = δ_t + γ λ m_{t+1} A_{t+1};  R_t = A_t + V_t.
    Returns (advantages [B, C], returns [B, C]), both 0 where mask is 0.
    """
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float,
) -> dict[str, torch.Tensor]:
    """Clipped policy and value losses, all inputs [B, C]; returns pg_loss, vf_loss (+ stats)."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
        approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return {"pg_loss": masked_mean(pg, mask), "vf_loss": masked_mean(vf, mask), "clipfrac": clipfrac, "approx_kl": approx_kl}


# ----------------------------------------------------------------------------- the models


class ValueHead(torch.nn.Module):
    """hidden [B, L, D] -> value [B, L]; zero-initialised, so every state starts at V = 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


class PolicyAndValue(torch.nn.Module):
    """The trained modules in one: `policy` (a causal LM, maybe PEFT) and the value function.

    value_backbone None: the head reads the policy's final hidden states (shared trunk);
    else a separate causal LM whose final hidden states feed the head.
    """

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead, value_backbone: torch.nn.Module | None = None):
        super().__init__()
        self.policy, self.value_head, self.value_backbone = policy, value_head, value_backbone

    def forward(self, input_ids, attention_mask):
        """[B, L] -> logits [B, L, V], values [B, L]."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        if self.value_backbone is None:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.value_backbone(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
            ).hidden_states[-1]
        return out.logits, self.value_head(hidden)


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, temperature: float) -> torch.Tensor:
    """log π(a_t) of the completion tokens: logits [B, L, V] at positions P-1..L-2 predict ids[:, P:]. -> [B, C]."""
    logits = logits[:, prompt_len - 1 : -1].float() / temperature
    targets = input_ids[:, prompt_len:]
    return torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- the trainer


class PPOTrainer:
    """PPO with a value function and a KL penalty to a frozen reference (see the module docstring).

    policy: causal LM (HF API, `generate`), trained; ref_model: frozen causal LM or None (kl_coef 0);
    reward_funcs / reward_weights: as GRPO's; train_dataset: a `datasets.Dataset` with a `prompt`
    column (other columns reach the rewards as keyword arguments); output_dir: checkpoints go to
    `output_dir/checkpoint-N/`; callbacks: `transformers.TrainerCallback`s, called on_step_end / on_log / on_save;
    spike_rate_weight: > 0 adds that weight × the completion tokens' spike rate to the loss.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        ref_model: torch.nn.Module | None,
        tokenizer,
        reward_funcs: Sequence[Callable],
        reward_weights: Sequence[float],
        train_dataset,
        args: PPOConfig,
        output_dir: str | Path,
        seed: int = 0,
        value_backbone: torch.nn.Module | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        logger=None,
        spike_rate_weight: float = 0.0,
    ):
        if "prompt" not in train_dataset.column_names:
            raise ValueError(f"ppo: the training dataset has no 'prompt' column (columns: {train_dataset.column_names})")
        if len(reward_funcs) != len(reward_weights) or not reward_funcs:
            raise ValueError(f"ppo: {len(reward_funcs)} reward functions but {len(reward_weights)} weights")
        if args.kl_coef > 0 and ref_model is None:
            raise ValueError("ppo: kl_coef > 0 needs a reference model")
        if tokenizer.pad_token_id is None:
            raise ValueError("ppo: the tokenizer has no pad token")
        if args.max_completion_length is None:
            raise ValueError("ppo: max_completion_length is not set (the rl stage sets it from the task)")
        self.args, self.tokenizer, self.dataset, self.seed = args, tokenizer, train_dataset, seed
        self.reward_funcs, self.reward_weights = list(reward_funcs), list(reward_weights)
        self.output_dir = Path(output_dir)
        self.callbacks, self.logger = list(callbacks), logger
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())

        hidden = (value_backbone or policy).config.hidden_size
        module = PolicyAndValue(policy, ValueHead(hidden), value_backbone)
        value_params = list(module.value_head.parameters()) + (list(value_backbone.parameters()) if value_backbone is not None else [])
        value_ids = {id(p) for p in value_params}
        policy_params = [p for p in policy.parameters() if p.requires_grad and id(p) not in value_ids]
        optimizer = torch.optim.AdamW(
            [
                {"params": policy_params, "lr": args.learning_rate},
                {"params": value_params, "lr": args.value_learning_rate or args.learning_rate},
            ],
            weight_decay=args.weight_decay,
        )
        total = args.max_steps
        decay = (lambda step: max(0.0, 1.0 - step / total)) if args.lr_scheduler == "linear" else (lambda step: 1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.scheduler = scheduler
        self.ref_model = None
        if ref_model is not None and args.kl_coef > 0:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        self.state = TrainerState(max_steps=args.max_steps, logging_steps=args.logging_steps, save_steps=args.save_steps)
        # hooks on the policy's neurons; the value backbone (a separate model) is not penalised
        self.spike_regulariser = SpikeRateRegulariser(policy, spike_rate_weight) if spike_rate_weight > 0 else None
        self.control = TrainerControl()

    # --- data ------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """Dataset rows of PPO step `step` on this process: a pure function of (seed, step).

        The rows are an endless sequence of per-epoch permutations (epoch e shuffled with seed+e);
        step s takes the s-th block of batch_size · processes rows, and this process its share.
        """
        n, per_process = len(self.dataset), self.args.batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = (step * world + rank) * per_process
        rows = []
        for position in range(start, start + per_process):
            epoch, offset = divmod(position, n)
            generator = torch.Generator().manual_seed(self.seed + epoch)
            rows.append(int(torch.randperm(n, generator=generator)[offset]))
        return rows

    # --- rollout and scoring -----------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> dict[str, Any]:
        """Sample completions for `rows` (dataset rows) and score them.

        Returns input_ids [N, P+C], attention_mask [N, P+C], completion_mask [N, C], prompt_len P,
        scores [N] (weighted reward sum), per-reward means, with N = rows · num_generations.
        """
        args, tokenizer = self.args, self.tokenizer
        rows = [row for row in rows for _ in range(args.num_generations)]
        prompts = [row["prompt"] for row in rows]
        with left_padded(tokenizer):  # every prompt ends at position P-1; completions follow directly
            batch = tokenizer(prompts, return_tensors="pt", padding=True).to(self.accelerator.device)
        policy = self.accelerator.unwrap_model(self.module).policy
        with eval_mode(policy):
            sequences = policy.generate(
                **batch,
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_completion_length,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        prompt_len = batch["input_ids"].shape[1]
        completion = sequences[:, prompt_len:]  # [N, C]
        completion_mask = torch.ones_like(completion)
        if tokenizer.eos_token_id is not None:
            is_eos = completion == tokenizer.eos_token_id
            # keep tokens up to and including the first EOS; later ones are padding
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            completion_mask = (~after_eos).long()
        completion = completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
        completion_ids = [ids[: int(m.sum())] for ids, m in zip(completion.tolist(), completion_mask)]
        eos = tokenizer.eos_token_id
        texts = [tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True) for ids in completion_ids]
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        per_func, scores = rewards_lib.score(self.reward_funcs, self.reward_weights, prompts, texts, columns, completion_ids)
        return {
            "input_ids": torch.cat([batch["input_ids"], completion], dim=1),
            "attention_mask": torch.cat([batch["attention_mask"], completion_mask], dim=1),
            "completion_mask": completion_mask.float(),
            "prompt_len": prompt_len,
            "scores": scores.to(self.accelerator.device),
            "reward_means": {getattr(f, "__name__", f"reward_{i}"): float(per_func[:, i].nanmean()) for i, f in enumerate(self.reward_funcs)},
            "completion_length": float(completion_mask.sum(1).float().mean()),
        }

    # --- one PPO step ------------------------------------------------------------------------
    def step(self, rows: list[dict]) -> dict[str, float]:
        args = self.args
        batch = self.rollout(rows)
        ids, attn, mask, P = batch["input_ids"], batch["attention_mask"], batch["completion_mask"], batch["prompt_len"]
        self.module.eval()  # the no-grad pass: no threshold adaptation
        with torch.no_grad():
            logits, values = self.module(ids, attn)
            old_logprobs = completion_logprobs(logits, ids, P, args.temperature)
            old_values = values[:, P - 1 : -1].float()  # V(state before token t) [N, C]
            del logits  # free logits, otherwise they peak memory next to the reference's
            if self.ref_model is not None:
                ref_logits = self.ref_model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                ref_logprobs = completion_logprobs(ref_logits, ids, P, args.temperature)
                del ref_logits
            else:
                ref_logprobs = old_logprobs
            kl = (old_logprobs - ref_logprobs) * mask
            rewards = -args.kl_coef * kl
            last = mask.sum(1).long() - 1  # index of each row's last completion token
            rewards[torch.arange(len(last)), last] += batch["scores"]
            advantages, returns = gae(rewards, old_values * mask, mask, args.gamma, args.lam)
            if args.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        sums: dict[str, float] = {}
        updates = 0
        self.module.train()
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(ids))
            for start in range(0, len(ids), args.mini_batch_size):
                pick = order[start : start + args.mini_batch_size].to(ids.device)
                if self.spike_regulariser is None:
                    logits, values = self.module(ids[pick], attn[pick])
                else:
                    with self.spike_regulariser.recording():
                        logits, values = self.module(ids[pick], attn[pick])
                logprobs = completion_logprobs(logits, ids[pick], P, args.temperature)
                losses = ppo_losses(
                    logprobs, old_logprobs[pick], advantages[pick], values[:, P - 1 : -1].float(),
                    old_values[pick], returns[pick], mask[pick], args.clip_range, args.clip_range_value,
                )
                loss = losses["pg_loss"] + args.vf_coef * losses["vf_loss"]
                if self.spike_regulariser is not None:
                    # the completion's tokens of [N, P + C]: prompt positions 0, then the completion mask
                    token_mask = torch.cat([mask.new_zeros(len(pick), P), mask[pick]], dim=1)
                    losses["spike_rate"] = self.spike_regulariser.rate(token_mask)
                    loss = loss + self.spike_regulariser.weight * losses["spike_rate"]
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.module.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                updates += 1
        self.scheduler.step()
        metrics = {key: value / updates for key, value in sums.items()}
        metrics.update(
            reward=float(batch["scores"].mean()),
            kl=float(kl.sum(1).mean()),
            completion_length=batch["completion_length"],
            learning_rate=self.scheduler.get_last_lr()[0],
            **{f"rewards/{name}": value for name, value in batch["reward_means"].items()},
        )
        return metrics

    # --- the loop ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | Path | None = None) -> dict[str, Any]:
        if resume_from_checkpoint is not None:
            self._load_checkpoint(Path(resume_from_checkpoint))
        else:
            torch.manual_seed(self.seed)
            random.seed(self.seed)
            np.random.seed(self.seed)
        recent: list[dict[str, float]] = []
        while self.state.global_step < self.args.max_steps:
            rows = [self.dataset[i] for i in self.batch_indices(self.state.global_step)]
            metrics = self.step(rows)
            self.state.global_step += 1
            for callback in self.callbacks:
                callback.on_step_end(self.args, self.state, self.control)
            recent.append(metrics)
            if self.state.global_step % self.args.logging_steps == 0 or self.state.global_step == self.args.max_steps:
                logs = {k: round(sum(m[k] for m in recent) / len(recent), 6) for k in recent[0]}
                logs["step"] = self.state.global_step
                self.state.log_history.append(logs)
                recent = []
                if self.logger is not None:
                    self.logger.info("ppo step %d: %s", self.state.global_step, logs)
                for callback in self.callbacks:
                    callback.on_log(self.args, self.state, self.control, logs=logs)
            if self.state.global_step % self.args.save_steps == 0 or self.state.global_step == self.args.max_steps:
                self._save_checkpoint()
        return {"steps": self.state.global_step, "log_history": self.state.log_history}

    # --- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        folder = self.output_dir / f"checkpoint-{self.state.global_step}"
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            module = self.accelerator.unwrap_model(self.module)
            save_model(module.policy, str(folder / "policy.safetensors"))
            value = torch.nn.ModuleDict({"head": module.value_head, **({"backbone": module.value_backbone} if module.value_backbone is not None else {})})
            save_model(value, str(folder / "value.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, folder / "rng_state.pth")
            self.state.save_to_json(str(folder / "trainer_state.json"))  # last: marks the checkpoint complete
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()
        for callback in self.callbacks:
            callback.on_save(self.args, self.state, self.control)

    def _rotate_checkpoints(self) -> None:
        folders = checkpoint_folders(self.output_dir)  # oldest first
        for _, old in folders[: -self.args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, folder: Path) -> None:
        module = self.accelerator.unwrap_model(self.module)
        load_model(module.policy, str(folder / "policy.safetensors"), device=str(self.accelerator.device))
        value = torch.nn.ModuleDict({"head": module.value_head, **({"backbone": module.value_backbone} if module.value_backbone is not None else {})})
        load_model(value, str(folder / "value.safetensors"), device=str(self.accelerator.device))
        # weights_only: a checkpoint folder may come from elsewhere; the RNG state holds numpy
        # arrays, which transformers' safe_globals allow-lists (as Trainer does for its own)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        with safe_globals():
            rng = torch.load(folder / "rng_state.pth", weights_only=True)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        saved = json.loads((folder / "trainer_state.json").read_text())
        self.state.global_step = saved["global_step"]
        self.state.log_history = saved.get("log_history", [])
        if saved.get("max_steps") not in (None, self.args.max_steps) and self.logger is not None:
            self.logger.warning("ppo: resuming from %s written with max_steps=%s, the recipe now says %s", folder, saved["max_steps"], self.args.max_steps)
