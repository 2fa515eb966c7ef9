"""rl stage: reinforcement learning on the deployed spiking policy (methods.md §9).

    spikerl run recipes/tiny.yaml --only rl

    stages:
      rl:
        algo: grpo                                 # grpo | rloo | dpo (TRL) | ppo (stages/ppo.py)
        rewards: [arith_exact, {spike_energy: 0.05}]   # name or {name: weight}; see rewards/
        energy_penalty: loss                       # where spike_energy's weight acts: loss | reward | both
        trl: {num_generations: 8, max_completion_length: 8, max_steps: 100}   # any GRPOConfig/RLOOConfig/DPOConfig field
        lora: {r: 8, alpha: 16, merge: true}       # optional PEFT LoRA, merged into the saved model

The policy is the newest finished model upstream (sparsify if the recipe has it, else distill),
run as deployed: SGC off (λ = 0), spikes on. Rollouts use the model's recurrent generation
(`generate` with the cache, one token at a time). The KL reference is the same input model,
loaded from its folder: TRL rebuilds it from `config._name_or_path` (GRPO / RLOO with beta > 0),
DPO gets it passed in, PPO loads it here. With LoRA the reference is the policy with its adapter
disabled (TRL's behaviour).

* grpo / rloo: TRL's trainers on the data stage's RL prompts (`prompts/train`: prompt, answer),
  rewards from `rewards/` with the recipe's weights (TRL's `reward_weights`).
* dpo: TRL's DPOTrainer on the data stage's `preferences/` (prompt, chosen, rejected) if present,
  else pairs built here from the verifiable task: k samples per prompt from the policy, chosen =
  the best-rewarded, rejected = the worst; prompts whose samples all score the same are skipped.
* ppo: the project's trainer (stages/ppo.py), configured by the `ppo:` block.

Energy (`{spike_energy: w}` in `rewards`): with `energy_penalty: loss` (default) the weight goes to
a differentiable spike-rate term added to the policy loss, `w × spikes per neuron channel per step`
on the completion tokens of the loss's own forward (spiking/regulariser.py `SpikeRateRegulariser`;
GRPO / RLOO through a thin subclass overriding the public `compute_loss`, PPO in its own loop).
The sequence-level `spike_energy` reward is still computed and logged, with weight 0 in the
advantages. `reward`: the sequence-level reward only (weight w; measured: does not move the
firing rate); `both`: both with weight w. DPO takes `reward` only (its pairs are ranked by it).

Output `run_dir/rl/`: the final policy (`save_pretrained`; with `lora.merge: false` the adapter
only) and the tokenizer; checkpoints in `run_dir/rl/checkpoints/` (resume from the newest).
Metrics: held-out exact-match accuracy, spikes per token, firing rate and energy per token (on
held-out prompt + reference answer, the same tokens before and after; energy with the 45 nm cost
table, memory access not counted) before and after, the energy ratio to the teacher when the run
has one, steps, the last logged rewards.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, load_from_disk
from pydantic import Field, field_validator, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer

import rewards as rewards_lib
import spiking
from spiking.regulariser import SpikeRateRegulariser
from stages import tasks
from stages.context import HubRepo, StageContext, StrictModel, push_to_hub_field
from stages.ppo import PPOConfig, PPOTrainer
from stages.training import (
    check_vocab,
    deepspeed_off,
    gathered,
    is_zero3_partitioned,
    load_checkpoint_weights,
    stage_callbacks,
    train_or_load,
)

try:  # PEFT is only needed for the optional LoRA
    import peft
except ImportError:  # pragma: no cover - peft is a dependency of the project
    peft = None

import trl

TRL_CONFIGS = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig, "dpo": trl.DPOConfig}
# set by the stage from the run / the rewards list; the recipe must not set them through `trl:`
OWNED_TRL_KEYS = {
    "output_dir": "the run sets it (run.output_dir)",
    "seed": "the run sets it (run.seed)",
    "reward_weights": "give weights in stages.rl.rewards ({name: weight})",
}


class LoraSpec(StrictModel):
    """PEFT LoRA on the mixer's linear layers instead of full fine-tuning."""

    r: int = Field(8, ge=1, description="adapter rank: more = more capacity, more memory")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="PEFT's target_modules: layer names (in_proj, x_proj, dt_proj, out_proj, ...) or "
        "'all-linear'; None: spiking.lora_target_modules() = [in_proj, x_proj, dt_proj]"
    )
    merge: bool = Field(True, description="true: merge into the saved model; false: save the adapter only")


class DPOPairs(StrictModel):
    """Where DPO's preference pairs come from."""

    source: Literal["auto", "data", "sample"] = Field(
        "auto", description="data: the data stage's preferences/; sample: built from the policy; auto: data if present"
    )
    samples_per_prompt: int = Field(4, ge=2, description="k answers sampled per prompt: more = more prompts with a pair")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the k answers")
    max_new_tokens: int | None = Field(None, ge=1, description="answer length (None: the task's answer budget)")
    max_prompts: int | None = Field(None, ge=1, description="RL prompts used to build pairs (None: all)")
    batch_size: int = Field(64, ge=1, description="prompts per sampling forward")


class Config(StrictModel):
    """`stages.rl:` recipe section."""

    algo: Literal["grpo", "rloo", "dpo", "ppo"] = Field("grpo", description="grpo / rloo / dpo through TRL; ppo: stages/ppo.py")
    rewards: list[str | dict[str, Any]] | dict[str, Any] = Field(
        default_factory=lambda: ["arith_exact"],
        description="reward names with weights: [arith_exact, {spike_energy: 0.05}] (energy weight: fewer spikes vs accuracy)",
    )
    energy_penalty: Literal["loss", "reward", "both"] = Field(
        "loss",
        description="where spike_energy's weight acts: loss = spike-rate term in the policy loss (moves the firing rate; "
        "the reward is logged only), reward = sequence-level reward only, both",
    )
    trl: dict[str, Any] = Field(default_factory=dict, description="fields of TRL's GRPOConfig / RLOOConfig / DPOConfig")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="the PPO trainer's settings (algo: ppo)")
    lora: LoraSpec | None = Field(None, description="PEFT LoRA instead of full fine-tuning (None: all weights train)")
    dpo: DPOPairs = Field(default_factory=DPOPairs, description="preference pairs for algo: dpo")
    eval_samples: int = Field(200, ge=1, description="held-out prompts for accuracy and spike counts before / after")
    eval_batch_size: int = Field(64, ge=1, description="prompts per evaluation forward")
    push_to_hub: HubRepo | None = push_to_hub_field()

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, value):
        rewards_lib.parse_spec(value)  # names, weights and arguments; dotted paths are imported here too
        return value

    @model_validator(mode="after")
    def _trl_keys(self):
        has_energy = any(name == "spike_energy" for name, _, _ in rewards_lib.parse_spec(self.rewards))
        if self.algo == "dpo" and has_energy and self.energy_penalty != "reward":
            raise ValueError(
                f"energy_penalty: {self.energy_penalty} needs an online algorithm (grpo, rloo, ppo); with dpo "
                "set energy_penalty: reward (pairs ranked by the spike_energy reward)"
            )
        if self.algo == "ppo":
            if self.trl:
                raise ValueError(f"trl: algo ppo is the project's trainer; set {sorted(self.trl)} under stages.rl.ppo")
            return self
        check_trl_keys(self.trl, self.algo)
        return self


# What the model card (README.md in the output folder, pipeline/model_card.py) shows of this
# stage's metrics: card field -> metric name; a field the stage does not measure is left out.
CARD_METRICS = {
    "accuracy": "accuracy_after", "samples": "eval_samples", "firing_rate": "firing_rate_after",
    "energy_pj_per_token": "energy_pj_per_token_after", "energy_ratio": "energy_ratio_after",
    "accuracy_before": "accuracy_before",
}


def check_trl_keys(trl_block: dict[str, Any], algo: str) -> dict[str, Any]:
    """Every `trl:` key must be a field of the algorithm's TRL config that the stage does not own."""
    config_class = TRL_CONFIGS[algo]
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    for key in trl_block:
        if key in OWNED_TRL_KEYS:
            raise ValueError(f"trl.{key}: {OWNED_TRL_KEYS[key]}, not through trl")
        if key not in known:
            raise ValueError(f"trl.{key}: not a field of trl.{config_class.__name__} (algo {algo})")
    return trl_block


# ----------------------------------------------------------------------------- inputs


def input_model_dir(ctx: StageContext) -> Path:
    """The newest finished model stage upstream: sparsify if the recipe has it, else distill."""
    return ctx.upstream["sparsify"] if "sparsify" in ctx.upstream else ctx.need("distill")


def load_policy(folder: Path):
    """The deployed spiking model from `folder` (SGC off, spikes on); it must have neurons."""
    model = spiking.load_deployed(folder)
    if not any(True for _ in spiking.iter_neurons(model)):
        raise ValueError(f"stages.rl: the model in {folder} has no spiking neurons (expected a distill / sparsify output)")
    return model


def load_tokenizer(model_dir: Path, data_dir: Path):
    folder = model_dir if (model_dir / "tokenizer_config.json").is_file() else data_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"stages.rl: the tokenizer in {folder} has no pad token")
    return tokenizer


def apply_lora(model, lora: LoraSpec):
    if peft is None:
        raise ImportError("stages.rl.lora needs peft: pip install 'peft==0.21.2'")
    # passed to PEFT as given: no neuron's name ends in a projection's name, so PEFT's own forms
    # (a list of layer names, "all-linear") adapt the projections and never a neuron
    targets = lora.target_modules if lora.target_modules else spiking.lora_target_modules()
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"stages.rl.lora.target_modules: {error}") from error


# ----------------------------------------------------------------------------- the energy term in TRL's loss


class SpikeRateLoss:
    """For TRL's GRPO / RLOO trainers: their loss + `w × spike rate` of the completion tokens.

    Overrides only the public `compute_loss` (and `log`, to report the rate), calling super() for
    TRL's own loss: the neurons' inputs are collected by `SpikeRateRegulariser`'s hooks during
    that very forward (TRL's fused-LM-head path calls the backbone directly; the neurons live in
    it, so they are seen either way). `spike_regulariser = None`: exactly TRL's trainer.
    """

    spike_regulariser: SpikeRateRegulariser | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        regulariser = self.spike_regulariser
        if regulariser is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with regulariser.recording():
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # TRL scores prompt + completion in one row [B, P + C]; only the completion's tokens count
        token_mask = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], dim=1)
        rate = regulariser.rate(token_mask)
        # TRL's loss is already divided for gradient accumulation (micro-batches summed): same here
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        self._spike_rates().append(float(rate.detach()))
        return loss + regulariser.weight * rate / accumulation

    def _spike_rates(self) -> list[float]:
        """The rates since the last log (kept on the instance, created on first use)."""
        return self.__dict__.setdefault("_spike_rate_log", [])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        rates = self._spike_rates()
        if rates:
            logs["spike_energy/rate"] = sum(rates) / len(rates)  # spikes per neuron channel per step, completions
            rates.clear()
        super().log(logs, start_time)


class GRPOWithSpikeRate(SpikeRateLoss, trl.GRPOTrainer):
    """TRL's GRPOTrainer + the spike-rate term (see `SpikeRateLoss`)."""


class RLOOWithSpikeRate(SpikeRateLoss, trl.RLOOTrainer):
    """TRL's RLOOTrainer + the spike-rate term (see `SpikeRateLoss`)."""


def with_spike_rate(trainer, weight: float):
    """Attach a `SpikeRateRegulariser` of `weight` to a `SpikeRateLoss` trainer (weight 0: none)."""
    if weight > 0:
        trainer.spike_regulariser = SpikeRateRegulariser(trainer.model, weight)
    return trainer


def split_energy_weight(funcs: list, weights: list[float], mode: str) -> tuple[list[float], float]:
    """(reward weights for the advantages, weight of the spike-rate loss term) for `energy_penalty`.

    >>> split_energy_weight([lambda: 0], [1.0], "loss")
    ([1.0], 0.0)
    """
    names = [getattr(f, "__name__", "") for f in funcs]
    if "spike_energy" not in names:
        return list(weights), 0.0
    index = names.index("spike_energy")
    energy = weights[index]
    reward_weights = list(weights)
    if mode == "loss":
        reward_weights[index] = 0.0  # still computed and logged by TRL / PPO, no effect on the advantages
    return reward_weights, (energy if mode in ("loss", "both") else 0.0)


# ----------------------------------------------------------------------------- measurements


def held_out_batches(tokenizer, test_ds, batch_size: int, device) -> list:
    """The held-out `prompt + answer` texts as left-padded batches (dicts of input_ids, attention_mask)."""
    texts = [p + a for p, a in zip(test_ds["prompt"], test_ds["answer"])]
    with tasks.left_padded(tokenizer):
        return [
            tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            for start in range(0, len(texts), batch_size)
        ]


@torch.no_grad()
def held_out_spikes(model, tokenizer, test_ds, batch_size: int) -> dict[str, float]:
    """Spikes per token, firing rate and energy per token on held-out `prompt + answer` texts
    (left-padded batches; padding not counted). Energy: `spiking.measure` (45 nm cost table,
    memory access not counted)."""
    energy, stats = spiking.measure(model, held_out_batches(tokenizer, test_ds, batch_size, model.device))
    overall = stats.overall()
    return {
        "spikes_per_token": overall["spikes_per_token"],
        "firing_rate": overall["firing_rate"],
        "energy_pj_per_token": energy.pj_per_token,
    }


def evaluate(model, tokenizer, test_ds, budget: int, batch_size: int, teacher_pj: float | None = None) -> dict[str, float]:
    """Held-out accuracy and spike / energy figures; `energy_ratio` = teacher's pJ per token / the model's."""
    accuracy = tasks.exact_match_accuracy(model, tokenizer, test_ds, max_new_tokens=budget, batch_size=batch_size)
    result = {"accuracy": accuracy["accuracy"], **held_out_spikes(model, tokenizer, test_ds, batch_size)}
    if teacher_pj is not None:
        result["energy_ratio"] = teacher_pj / result["energy_pj_per_token"]
    return result


def teacher_energy(ctx: StageContext, batches: list) -> float | None:
    """The teacher's energy per token on `batches` (dense: no forward needed; a Transformer's
    attention at those texts' mean context, as the policy's spikes are measured), or None when the
    run has no teacher stage."""
    folder = ctx.upstream.get("teacher")
    if folder is None or not (folder / "config.json").is_file():
        return None
    teacher = AutoModelForCausalLM.from_pretrained(folder)
    return spiking.measure(teacher, batches)[0].pj_per_token


# ----------------------------------------------------------------------------- DPO pairs


@torch.no_grad()
def sample_preference_pairs(policy, tokenizer, prompts_ds, reward_funcs, reward_weights, pairs: DPOPairs, max_new_tokens: int) -> Dataset:
    """(prompt, chosen, rejected) from k sampled answers per prompt, scored by the rewards.

    chosen = the best-scored sample, rejected = the worst; a prompt whose k samples all score the
    same (all rewarded or none) gives no pair. Sampling uses the global torch RNG (seeded by the run).
    """
    if pairs.max_prompts is not None:
        prompts_ds = prompts_ds.select(range(min(pairs.max_prompts, len(prompts_ds))))
    k = pairs.samples_per_prompt
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for start in range(0, len(prompts_ds), pairs.batch_size):
        chunk = prompts_ds.select(range(start, min(start + pairs.batch_size, len(prompts_ds))))
        prompts = [p for p in chunk["prompt"] for _ in range(k)]
        completions = _sample(policy, tokenizer, prompts, max_new_tokens, pairs.temperature)
        columns = {c: [v for v in chunk[c] for _ in range(k)] for c in chunk.column_names if c != "prompt"}
        _, total = rewards_lib.score(reward_funcs, reward_weights, prompts, completions, columns)
        scores = total.view(-1, k)  # [prompts, k]
        for j, prompt in enumerate(chunk["prompt"]):
            best, worst = int(scores[j].argmax()), int(scores[j].argmin())
            if scores[j, best] > scores[j, worst]:
                rows["prompt"].append(prompt)
                rows["chosen"].append(completions[j * k + best])
                rows["rejected"].append(completions[j * k + worst])
    return Dataset.from_dict(rows)


def _sample(policy, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float) -> list[str]:
    with tasks.left_padded(tokenizer), tasks.eval_mode(policy):
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(policy.device)
        generated = policy.generate(
            **batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = generated[:, batch["input_ids"].shape[1] :].tolist()
    return [tokenizer.decode(tasks.cut_at_eos(row, tokenizer.eos_token_id), skip_special_tokens=True) for row in new_tokens]


# ----------------------------------------------------------------------------- the stage


def trl_args(cfg: Config, ctx: StageContext, budget: int, weights: list[float]):
    """The TRL config: the stage's defaults, then the recipe's `trl:` block on top."""
    config_class = TRL_CONFIGS[cfg.algo]
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.checkpoint_dir),
        seed=ctx.seed,
        data_seed=ctx.seed,
        max_steps=100,
        logging_steps=10,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=2,
        report_to="none",
        dataloader_num_workers=0,
    )
    if not torch.cuda.is_available():
        kwargs.update(use_cpu=True, bf16=False)
    if cfg.algo in ("grpo", "rloo"):
        kwargs.update(max_completion_length=budget, reward_weights=weights)
    kwargs.update(check_trl_keys(dict(cfg.trl), cfg.algo))
    return config_class(**kwargs)


def load_rl_checkpoint(model, checkpoint: Path) -> None:
    """Load a TRL checkpoint's weights into `model`: the LoRA adapter with peft, else the whole model."""
    adapter = Path(checkpoint) / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(adapter))
    else:
        load_checkpoint_weights(model, checkpoint)


def run(cfg: Config, ctx: StageContext) -> dict:
    data_dir = ctx.need("data")
    model_dir = input_model_dir(ctx)
    prompts = load_from_disk(str(data_dir / "prompts"))
    tokenizer = load_tokenizer(model_dir, data_dir)
    policy = load_policy(model_dir)
    check_vocab(policy, tokenizer, f"stages.rl: model {model_dir}")
    train_ds, test_ds = prompts["train"], prompts["test"].select(range(min(cfg.eval_samples, len(prompts["test"]))))
    if len(train_ds) == 0:
        raise ValueError(f"stages.rl: {data_dir / 'prompts'} has no RL prompts (train split is empty: raise data.rl_prompts)")
    budget = tasks.answer_token_budget(tokenizer, test_ds["answer"])

    metrics: dict[str, Any] = {"algo": cfg.algo, "input_model": model_dir.name}
    teacher_pj = None
    if ctx.is_main_process:
        teacher_pj = teacher_energy(ctx, held_out_batches(tokenizer, test_ds, cfg.eval_batch_size, "cpu"))
    if ctx.is_main_process:
        before = evaluate(policy, tokenizer, test_ds, budget, cfg.eval_batch_size, teacher_pj)
        metrics.update({f"{key}_before": value for key, value in before.items()})
        ctx.logger.info("rl: input model %s: %s", model_dir, before)

    if cfg.lora is not None:
        policy = apply_lora(policy, cfg.lora)
    reward_funcs, weights = rewards_lib.build_rewards(cfg.rewards, policy=policy, tokenizer=tokenizer)
    weights, spike_rate_weight = split_energy_weight(reward_funcs, weights, cfg.energy_penalty)
    if spike_rate_weight > 0:
        ctx.logger.info("rl: spike_energy %.4g as a spike-rate term in the loss (energy_penalty: %s)", spike_rate_weight, cfg.energy_penalty)
    resume = ctx.last_checkpoint()
    callbacks = stage_callbacks(ctx)

    if cfg.algo == "ppo":
        ppo_cfg = cfg.ppo if cfg.ppo.max_completion_length else cfg.ppo.model_copy(update={"max_completion_length": budget})
        ref_model = load_policy(model_dir) if ppo_cfg.kl_coef > 0 else None
        value_backbone = load_policy(model_dir) if ppo_cfg.value_model == "separate" else None
        trainer = PPOTrainer(
            policy, ref_model, tokenizer, reward_funcs, weights, train_ds, ppo_cfg, ctx.checkpoint_dir,
            seed=ctx.seed, value_backbone=value_backbone, callbacks=callbacks, logger=ctx.logger,
            spike_rate_weight=spike_rate_weight,
        )
        result = trainer.train(resume_from_checkpoint=resume)
        steps, history = result["steps"], result["log_history"]
    else:
        args = trl_args(cfg, ctx, budget, weights)
        common = dict(model=policy, args=args, processing_class=tokenizer, callbacks=callbacks)
        if cfg.algo == "grpo":
            trainer = GRPOWithSpikeRate(reward_funcs=reward_funcs, train_dataset=train_ds, **common)
            with_spike_rate(trainer, spike_rate_weight)
        elif cfg.algo == "rloo":
            trainer = RLOOWithSpikeRate(reward_funcs=reward_funcs, train_dataset=train_ds, **common)
            with_spike_rate(trainer, spike_rate_weight)
        else:
            pairs = dpo_pairs(cfg, ctx, data_dir, policy, tokenizer, train_ds, reward_funcs, weights, budget)
            metrics["dpo_pairs"] = len(pairs)
            # the reference = the input model from its folder (with LoRA: the policy, adapter off)
            ref_model = None if cfg.lora is not None else load_policy(model_dir)
            trainer = trl.DPOTrainer(ref_model=ref_model, train_dataset=pairs, **common)
        done = train_or_load(trainer, resume, ctx, load=load_rl_checkpoint)
        steps, history = done["steps"], done["log_history"]
        policy = trainer.model
        if getattr(trainer, "spike_regulariser", None) is not None:
            trainer.spike_regulariser.close()

    final = policy
    zero3 = cfg.algo != "ppo" and is_zero3_partitioned(policy)  # PPO: our loop, DDP only
    if cfg.lora is not None and cfg.lora.merge:
        if zero3:
            raise ValueError("stages.rl.lora.merge: merging under DeepSpeed ZeRO-3 is not supported; set merge: false "
                             "(saves the adapter) or use recipes/accelerate/zero2.yaml")
        final = policy.merge_and_unload()
    spiking.set_sgc_lambda(final, 0.0)
    metrics["steps"] = steps
    metrics["spike_rate_weight"] = spike_rate_weight
    if zero3:
        trainer.save_model(str(ctx.out_dir))  # every rank: gathers the ZeRO-3 shards, rank 0 writes
    if not ctx.is_main_process:
        return metrics
    if not zero3:
        final.save_pretrained(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)
    deepspeed_off()  # rank 0 alone from here: under ZeRO-3 evaluate the saved, whole policy
    final = gathered(final, ctx.out_dir, load_policy)
    after = evaluate(final, tokenizer, test_ds, budget, cfg.eval_batch_size, teacher_pj)
    metrics.update({f"{key}_after": value for key, value in after.items()})
    metrics["eval_samples"] = len(test_ds)
    logged = [entry for entry in history if any(k.startswith("rewards/") or k == "reward" for k in entry)]
    if logged:
        metrics["last_logged"] = {k: v for k, v in logged[-1].items() if isinstance(v, (int, float))}
    (ctx.out_dir / "rl_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def dpo_pairs(cfg: Config, ctx: StageContext, data_dir: Path, policy, tokenizer, train_ds, reward_funcs, weights, budget) -> Dataset:
    """The data stage's pairs (source data / auto when present) or pairs sampled from the policy."""
    stored = data_dir / "preferences"
    if cfg.dpo.source == "data" or (cfg.dpo.source == "auto" and stored.is_dir()):
        if not stored.is_dir():
            raise ValueError(f"stages.rl.dpo.source: data, but {stored} does not exist (set stages.data.preference_pairs)")
        pairs = load_from_disk(str(stored))
        missing = {"prompt", "chosen", "rejected"} - set(pairs.column_names)
        if missing:
            raise ValueError(f"stages.rl: {stored} lacks the columns {sorted(missing)}")
        return pairs.select_columns(["prompt", "chosen", "rejected"])
    torch.manual_seed(ctx.seed)  # a resumed attempt rebuilds the same pairs
    pairs = sample_preference_pairs(
        policy, tokenizer, train_ds, reward_funcs, weights, cfg.dpo, cfg.dpo.max_new_tokens or budget
    )
    ctx.logger.info("rl: built %d DPO pairs from %d prompts × %d samples", len(pairs), len(train_ds), cfg.dpo.samples_per_prompt)
    if len(pairs) == 0:
        raise ValueError(
            f"stages.rl.dpo: no prompt had samples with different rewards among {cfg.dpo.samples_per_prompt} per prompt "
            "(raise dpo.samples_per_prompt or dpo.temperature, or give the data stage's preference pairs)"
        )
    return pairs
