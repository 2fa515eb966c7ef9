"""eval stage: every model of the run side by side on the same prompts and the same tokens.

    spikerl run recipes/tiny.yaml --only eval
    spikerl report runs/tiny                   # rebuild the report from the files alone

For the teacher and each finished model stage of the recipe (distill, sparsify, rl), in that
order, measured the same way:

* task accuracy: greedy completions of the data stage's held-out prompts (`prompts/test`, first
  `eval_samples`), generated through the model's recurrent path (`generate` with the cache, one
  token at a time), scored by each function of `tasks` (reward names of `rewards/`, e.g.
  `arith_exact`, `math_answer`): the mean over the rows it applies to.
* perplexity on the first `eval_blocks` packed blocks of the held-out corpus (`corpus/test`).
* firing rate per layer, per module type (in_proj, out_proj, ...) and overall, counted with
  `spiking.count_spikes` on those same blocks; and the energy per token on them under every cost
  model of `cost_models` (45nm-horowitz, 45nm-int8, 45nm-memory at batch 1 and at the eval batch;
  methods.md §8, §10) with the ratio to the teacher under each, against the INT8 teacher, and the
  break-even firing rate under 45nm-memory; the breakdown per op and per op kind is 45nm-horowitz's
  (MAC 4.6 pJ, AC 0.9 pJ, Mul 3.7 pJ, compute only). The attention layers (a Llama teacher, a
  hybrid student's kept layers) are counted at the held-out blocks' own causal context; under
  45nm-horowitz also at each of `energy_contexts` keys per token, with the ratio to the teacher at
  each (the same spike counts, no extra forward; every model, so the table compares like with like:
  a Mamba model's energy does not depend on the context; methods.md §12).
* parameter count; lm-eval zero-shot tasks when `lm_eval` lists any, through lm-eval's own
  `HFLM` wrapper around the in-memory model (the paper's six tasks by default; a local task
  folder through `lm_eval_include_path`, e.g. recipes/lm_eval_tasks).

A model stage the recipe does not run (or that left no manifest) is recorded as missing, with the
reason, never as zero. The teacher runs in the project's mixer with no neurons (the same numbers
as HF Mamba); the students run as deployed: SGC off, spikes on.

Output `run_dir/eval/`: `metrics.json` (everything above, with the machine and the date) and the
report `report/` (report.md, report.json, PNG plots; stages/report.py). The manifest's metrics
are the headline figures per stage (`teacher/accuracy`, `rl/energy_ratio`, ...).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import load_from_disk
from pydantic import Field, field_validator
from transformers import AutoTokenizer

import rewards as rewards_lib
import spiking
from stages import MODEL_STAGES, tasks
from stages.context import StageContext, StrictModel, local_path
from stages.report import PAPER_TASKS, build_report
from stages.training import check_vocab, load_compute_teacher

try:  # lm-eval is optional (`pip install 'spikerl[eval]'`): needed only when `lm_eval` lists tasks
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError:  # pragma: no cover - lm-eval is in the dev extra
    lm_eval = None

# The metric the Mamba paper reports per task (acc_norm where it is length-normalised); others: acc
LM_EVAL_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}

# Op of spiking/energy.py -> the group it is drawn in (report's stacked bars); neurons: "<p>.neuron"
OP_GROUPS = {
    "in_proj": "in_proj", "out_proj": "out_proj", "x_proj": "x_proj / dt_proj", "dt_proj": "x_proj / dt_proj",
    "conv1d": "conv1d", "conv_silu": "gate / SiLU", "gate": "gate / SiLU",
    "dt_softplus": "selective scan", "discretize_A": "selective scan", "discretize_B_x": "selective scan",
    "scan_state": "selective scan", "scan_output": "selective scan", "D_skip": "selective scan",
    "norm": "norms / residual", "residual": "norms / residual", "norm_f": "norms / residual",
    "mlp.norm": "mlp", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.act": "mlp", "mlp.down_proj": "mlp",
    "mlp.residual": "mlp", "lm_head": "lm_head",
    "bc_proj": "x_proj / dt_proj",  # B, C: x_proj's former outputs, projected from the block input
    "q_proj": "attention q/k/v/o", "k_proj": "attention q/k/v/o", "v_proj": "attention q/k/v/o",
    "o_proj": "attention q/k/v/o", "rope": "attention (RoPE, QKᵀ, softmax, AV)",
    "attn_scores": "attention (RoPE, QKᵀ, softmax, AV)", "attn_softmax": "attention (RoPE, QKᵀ, softmax, AV)",
    "attn_values": "attention (RoPE, QKᵀ, softmax, AV)",
}


class Config(StrictModel):
    """`stages.eval:` recipe section."""

    models: list[Literal["teacher", "distill", "sparsify", "rl"]] = Field(
        default_factory=lambda: list(MODEL_STAGES),
        description="model stages to evaluate; one the recipe does not run is reported as missing",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["arith_exact"],
        description="scorers of the held-out prompts' greedy completions (reward names: arith_exact, math_answer)",
    )
    lm_eval: list[str] = Field(
        default_factory=lambda: list(PAPER_TASKS),
        description="lm-eval zero-shot tasks (the paper's six need the hub; [] = none)",
    )
    lm_eval_include_path: str | None = local_path(
        kind="folder", description="folder of extra lm-eval task YAMLs (e.g. recipes/lm_eval_tasks), relative to the current directory"
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="documents per lm-eval task (None = all): fewer = faster, noisier")
    lm_eval_batch_size: int = Field(16, ge=1, description="lm-eval requests per forward")
    lm_eval_max_length: int = Field(2048, ge=8, description="longest context + continuation lm-eval may feed, in tokens")
    energy: bool = Field(True, description="firing rates and energy per token on the held-out blocks")
    energy_contexts: list[int] = Field(
        default_factory=lambda: [256, 2048],
        description="attention contexts (keys each token attends) at which energy per token is also reported, "
        "45nm-horowitz, every model (an attention layer's cost grows with it, a Mamba layer's does not); [] = none",
    )
    eval_samples: int = Field(400, ge=1, description="held-out prompts scored for task accuracy")
    eval_blocks: int = Field(16, ge=1, description="held-out corpus blocks for perplexity, firing rates and energy")
    eval_batch_size: int = Field(64, ge=1, description="prompts / blocks per evaluation forward")
    max_new_tokens: int | None = Field(None, ge=1, description="greedy budget per prompt (None: longest answer + 2 tokens)")
    report: bool = Field(True, description="write the report (eval/report/: markdown, JSON, PNG plots) at the end")

    @field_validator("tasks")
    @classmethod
    def _known_scorers(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in rewards_lib.REWARDS]
        if unknown:
            raise ValueError(f"unknown task scorer {unknown[0]!r}; expected reward names {sorted(rewards_lib.REWARDS)}")
        if not value:
            raise ValueError("list at least one scorer (e.g. arith_exact)")
        return value

    @field_validator("energy_contexts")
    @classmethod
    def _contexts(cls, value: list[int]) -> list[int]:
        if any(c < 1 for c in value):
            raise ValueError(f"every context must be >= 1 key per token, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"a context is listed twice: {value}")
        return value

    @field_validator("models")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a model stage is listed twice: {value}")
        return value


# ------------------------------------------------------------------------------ measurements


def task_scores(completions: list[str], prompts_ds, task_names: list[str]) -> dict[str, list[float | None]]:
    """Per scorer: its score of every row, in order (None where it does not apply).

    A scorer is a reward function of `rewards.REWARDS`, called like TRL calls it: the
    completions plus every dataset column (`answer=[...]`).
    """
    columns = {c: prompts_ds[c] for c in prompts_ds.column_names if c != "prompt"}
    return {name: list(rewards_lib.REWARDS[name](completions=completions, prompts=prompts_ds["prompt"], **columns))
            for name in task_names}


def mean_and_interval(values: list[float | None], seed: int) -> tuple[float | None, list[float] | None]:
    """(mean over the rows a scorer applies to, its 95% bootstrap interval); (None, None) for none."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return sum(kept) / len(kept), list(tasks.bootstrap_ci(kept, seed=seed))


def paired(values: list[float | None], baseline: list[float | None], seed: int) -> dict[str, Any] | None:
    """Mean difference values − baseline on the rows both scored, with its paired 95% interval."""
    pairs = [(v, b) for v, b in zip(values, baseline) if v is not None and b is not None]
    if not pairs:
        return None
    a, b = [v for v, _ in pairs], [w for _, w in pairs]
    return {"difference": (sum(a) - sum(b)) / len(pairs), "ci95": list(tasks.bootstrap_ci(a, b, seed=seed)), "n": len(pairs)}


@torch.no_grad()
def unigram_perplexity(train_blocks, test_blocks, vocab_size: int) -> float:
    """The baseline every LM must beat: exp(mean −log p(token)) on the held-out blocks' predicted
    positions (1..L−1, as `tasks.perplexity` scores), p = the training corpus's token frequencies
    with add-one smoothing over the vocabulary."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for start in range(0, len(train_blocks), 1024):
        ids = torch.tensor(train_blocks[start : start + 1024]["input_ids"]).reshape(-1)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    log_p = counts.log() - counts.sum().log()
    targets = torch.tensor(test_blocks["input_ids"])[:, 1:].reshape(-1)
    return float(torch.exp(-log_p[targets].mean()))


def firing_rates(stats: spiking.SpikeStats, num_layers: int) -> dict[str, Any]:
    """Overall, per layer (index 0..L-1; None for a layer without neurons) and per module type."""
    by_layer: list[dict[str, int]] = [{"nonzero": 0, "elements": 0} for _ in range(num_layers)]
    by_layer_module: list[dict[str, float]] = [{} for _ in range(num_layers)]
    for record in stats.by_name().values():
        layer = record["layer"]
        if layer is None:
            continue
        by_layer[layer]["nonzero"] += record["nonzero"]
        by_layer[layer]["elements"] += record["elements"]
        by_layer_module[layer][record["placement"]] = record["firing_rate"]
    overall = stats.overall()
    return {
        "firing_rate": overall["firing_rate"],
        "spikes_per_token": overall["spikes_per_token"],
        "firing_rate_by_layer": [r["nonzero"] / r["elements"] if r["elements"] else None for r in by_layer],
        "firing_rate_by_layer_module": by_layer_module,
        "firing_rate_by_module": {p: d["firing_rate"] for p, d in stats.by_placement().items()},
    }


def energy_figures(report: spiking.EnergyReport) -> dict[str, Any]:
    """Energy per token of one EnergyReport: total, per op kind (MAC / AC / Mul), per op, per group.

    Every figure is a sum over the report's layers of spiking/energy.py's own counts, so
    `pj_per_token` is exactly `report.pj_per_token`.
    """
    cost = report.cost
    total = report.total
    by_op: dict[str, dict[str, float]] = {}
    spike_driven: set[str] = set()
    for layer in report.layers:
        for op, count in layer.ops.items():
            entry = by_op.setdefault(op, {"mac": 0.0, "ac": 0.0, "mul": 0.0, "pj": 0.0})
            entry["mac"] += count.mac
            entry["ac"] += count.ac
            entry["mul"] += count.mul
            entry["pj"] += count.energy_pj(cost)
        for placement in layer.spikes_per_token:  # the linear layers this block feeds with spikes
            spike_driven.update(op for op in spiking.MODULE_OPS[placement] if op in layer.ops and not op.endswith(".neuron"))
    by_group: dict[str, float] = {}
    for op, entry in by_op.items():
        group = "neurons" if op.endswith(".neuron") else OP_GROUPS.get(op, op)
        by_group[group] = by_group.get(group, 0.0) + entry["pj"]
    return {
        "pj_per_token": report.pj_per_token,
        "counts_per_token": {"mac": total.mac, "ac": total.ac, "mul": total.mul},
        "pj_by_kind": {"mac": total.mac * cost.mac_pj, "ac": total.ac * cost.ac_pj, "mul": total.mul * cost.mul_pj},
        "pj_by_group": by_group,
        "by_op": by_op,
        "spike_driven_ops": sorted(spike_driven),  # accumulate-only: Σ|s|·n_out ACs
        "neuron_ops": sorted(op for op in by_op if op.endswith(".neuron")),
        "dense_ops": sorted(op for op in by_op if op not in spike_driven and not op.endswith(".neuron")),
        "tokens": report.tokens,
        "context": report.context,  # keys per token the attention layers were counted at; None: none
    }


@torch.no_grad()
def cost_models(eval_batch: int) -> dict[str, spiking.CostTable]:
    """The cost models every model is counted under (methods.md §8, §10), by the name reports use:
    compute-only fp32 (the papers'), compute-only int8, memory-inclusive at batch 1 (decode) and at
    the evaluation batch (weights read from DRAM once per batch)."""
    tables = [spiking.HOROWITZ_45NM, spiking.HOROWITZ_45NM_INT8, spiking.memory_model(1), spiking.memory_model(eval_batch)]
    return {table.name: table for table in tables}


def context_key(context: int) -> str:
    """The key of an attention context in `energy_by_context` (and the metric suffix): 256 -> ctx256."""
    return f"ctx{context}"


def energy_by_context(model, stats, tokens: int, contexts: list[int]) -> dict[str, Any]:
    """Energy per token under 45nm-horowitz (compute only) with the attention layers attending c
    keys per token, for each c of `contexts`: the measured spike counts recosted, no forward (spikes
    do not depend on c). An attention-free model gets the same figure at every c."""
    cost = spiking.HOROWITZ_45NM
    return {
        "cost_model": cost.name,
        "contexts": list(contexts),
        "attention": spiking.has_attention(model),
        "pj_per_token": {context_key(c): spiking.energy_report(model, stats, tokens, cost, context=c).pj_per_token
                         for c in contexts},
        "ratio_to_teacher": None,  # filled in by `run` once the teacher's figures are known
    }


def measure_energy(model, held_out: torch.Tensor, costs: dict[str, spiking.CostTable],
                   contexts: list[int] | tuple[int, ...] = ()) -> tuple[dict[str, Any], Any]:
    """Firing rates and energy per token of `model` on held-out blocks `held_out` [B, L]: one
    forward, its spike counts costed under every model of `costs` (the first is the headline,
    `energy`; all are in `energy_by_cost_model`), the attention layers at the blocks' causal context,
    and under 45nm-horowitz at each of `contexts` (`energy_by_context`, when any). Returns
    (figures, spike stats or None)."""
    first, *_ = costs.values()
    report, stats = spiking.measure(model, held_out, first)
    tokens, context = report.tokens, report.context  # every cost model at the same (measured) context
    by_model = {name: spiking.energy_report(model, stats, tokens, cost, context=context).pj_per_token
                for name, cost in costs.items()}
    # break_even_firing_rate: filled in by `run` for a spiking model once the teacher's figures are known
    figures = {"energy": energy_figures(report), "energy_by_cost_model": {"pj_per_token": by_model, "break_even_firing_rate": None}}
    if contexts:
        figures["energy_by_context"] = energy_by_context(model, stats, tokens, list(contexts))
    if stats is None:  # dense
        return {"firing_rate": None, **figures}, None
    return {**firing_rates(stats, len(model.backbone.layers)), **figures}, stats


def energy_ratios(entry: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    """E_teacher / E_model per cost model, and against the INT8 teacher (the teacher under 45nm-int8,
    the model under 45nm-horowitz: a quantised dense baseline against the spiking model as trained)."""
    mine = entry["energy_by_cost_model"]["pj_per_token"]
    theirs = (teacher.get("energy_by_cost_model") or {}).get("pj_per_token") or {}
    ratios = {name: theirs[name] / pj if name in theirs and pj else None for name, pj in mine.items()}
    int8, fp32 = theirs.get(spiking.HOROWITZ_45NM_INT8.name), mine.get(spiking.HOROWITZ_45NM.name)
    ratios["int8-teacher"] = int8 / fp32 if int8 is not None and fp32 else None
    return ratios


def context_ratios(entry: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    """E_teacher / E_model under 45nm-horowitz at each attention context (both at the same c)."""
    mine = entry["energy_by_context"]["pj_per_token"]
    theirs = (teacher.get("energy_by_context") or {}).get("pj_per_token") or {}
    return {key: theirs[key] / pj if key in theirs and pj else None for key, pj in mine.items()}


def lm_eval_scores(model, tokenizer, task_names: list[str], task_manager, cfg: Config, seed: int
                   ) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """lm-eval zero-shot results of the in-memory `model`: (task -> {metric: value}, stderr left out;
    task -> the headline metric of every document, for the bootstrap intervals)."""
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, backend="causal",
        max_length=cfg.lm_eval_max_length, batch_size=cfg.lm_eval_batch_size,
    )
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(task_names), task_manager=task_manager, limit=cfg.lm_eval_limit,
        log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key
            and key.split(",")[0] not in ("sample_len",)
        }
    per_doc = {}
    for task, samples in (out.get("samples") or {}).items():
        metric = headline_metric(task, results.get(task) or {})
        per_doc[task] = [float(sample[metric]) for sample in samples if metric in sample]
    return results, per_doc


def headline_metric(task: str, available) -> str | None:
    """The metric a task is reported by: the Mamba paper's (acc_norm for HellaSwag / ARC-c), else acc,
    else the task's only (or first) metric, e.g. exact_match of a generate-until task."""
    available = list(available)
    for metric in (LM_EVAL_METRIC.get(task), "acc"):
        if metric in available:
            return metric
    return available[0] if available else None


def lm_eval_headline(results: dict[str, dict[str, float]], task_names: list[str]) -> dict[str, float | None]:
    """Task -> its headline metric's value (`headline_metric`)."""
    headline = {}
    for task in task_names:
        metrics = results.get(task, {})
        metric = headline_metric(task, metrics)
        headline[task] = metrics.get(metric) if metric is not None else None
    return headline


def build_task_manager(cfg: Config, data_dir: Path | None = None, later: tuple[str, ...] = ()):
    """lm-eval's TaskManager with the recipe's include path and the data stage's own tasks
    (`data_dir/lm_eval_tasks`, e.g. the held-out last-word tasks); every listed task must be known
    to it, except the `later` names (tasks the data stage writes when it runs: preflight)."""
    if lm_eval is None:
        raise ImportError(
            f"stages.eval.lm_eval lists {cfg.lm_eval} but lm-eval is not installed: pip install 'spikerl[eval]' "
            "(or set stages.eval.lm_eval: [])"
        )
    include = []
    if cfg.lm_eval_include_path is not None:
        folder = Path(cfg.lm_eval_include_path)
        if not folder.is_dir():
            raise ValueError(f"stages.eval.lm_eval_include_path: {folder} is not a folder (from {Path.cwd()})")
        include.append(str(folder.resolve()))
    if data_dir is not None and (data_dir / "lm_eval_tasks").is_dir():
        include.append(str((data_dir / "lm_eval_tasks").resolve()))
    manager = TaskManager(include_path=include or None)
    include = ", ".join(include) or None
    unknown = [name for name in cfg.lm_eval if name not in manager.all_tasks and name not in later]
    if unknown:
        raise ValueError(
            f"stages.eval.lm_eval: unknown lm-eval task {unknown[0]!r}"
            + (f" (not in lm-eval nor in {include})" if include else " (a local task needs stages.eval.lm_eval_include_path)")
        )
    return manager


# ------------------------------------------------------------------------------ the stage


def preflight(cfg: Config, ctx: StageContext) -> None:
    """Before the run folder is touched: every lm-eval task is known (to lm-eval or the include path)."""
    if cfg.lm_eval:
        build_task_manager(cfg, later=tasks.LASTWORD_TASKS)


def machine() -> dict[str, Any]:
    """Where the numbers were measured (the report states it)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def find_models(cfg: Config, ctx: StageContext) -> tuple[dict[str, Path], dict[str, str]]:
    """(stage -> model folder to evaluate, stage -> why it is missing), in pipeline order."""
    found, missing = {}, {}
    for name in cfg.models:
        folder = ctx.run_dir / name
        if name not in ctx.upstream:
            missing[name] = "not in this run's recipe" + (" (its folder is from another recipe: not used)" if folder.is_dir() else "")
        elif not (ctx.upstream[name] / "manifest.json").is_file():
            missing[name] = "not finished (no manifest)"
        elif not (ctx.upstream[name] / "config.json").is_file():
            missing[name] = "no full model in its folder (e.g. an RL LoRA adapter saved with merge: false)"
        else:
            found[name] = ctx.upstream[name]
    return found, missing


def load_model(name: str, folder: Path, ctx: StageContext):
    """The teacher in the project's mixer (dense), or a student as deployed (SGC off, spikes on)."""
    if name == "teacher":
        return load_compute_teacher(folder, ctx)
    model = spiking.load_deployed(folder)
    return model.to("cuda") if torch.cuda.is_available() else model


def run(cfg: Config, ctx: StageContext) -> dict:
    data_dir = ctx.need("data")
    if not ctx.is_main_process:
        return {}  # evaluation trains nothing: rank 0 measures, the others wait at the runner's barrier
    found, missing = find_models(cfg, ctx)
    if not found:
        raise ValueError(f"stages.eval.models: none of {cfg.models} is finished in {ctx.run_dir} ({missing})")
    task_manager = build_task_manager(cfg, data_dir) if cfg.lm_eval else None  # fails before any model is loaded
    corpus, prompts = load_from_disk(str(data_dir / "corpus")), load_from_disk(str(data_dir / "prompts"))
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    test_prompts = prompts["test"].select(range(min(cfg.eval_samples, len(prompts["test"]))))
    blocks = corpus["test"].select(range(min(cfg.eval_blocks, len(corpus["test"]))))
    if len(test_prompts) == 0 or len(blocks) == 0:
        raise ValueError(f"stages.eval: {data_dir} has no held-out prompts or corpus blocks to evaluate on")
    budget = cfg.max_new_tokens or tasks.answer_token_budget(tokenizer, test_prompts["answer"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    held_out = torch.tensor(blocks["input_ids"], device=device)  # [eval_blocks, L]: the same tokens for every model

    costs = cost_models(cfg.eval_batch_size)
    memory_1 = spiking.memory_model(1)
    results: dict[str, dict[str, Any]] = {}
    for name, folder in found.items():
        started = time.perf_counter()
        model = load_model(name, folder, ctx)
        check_vocab(model, tokenizer, f"stages.eval: model {folder}")
        completions = tasks.generate_completions(model, tokenizer, test_prompts["prompt"], budget, cfg.eval_batch_size)
        per_example = task_scores(completions, test_prompts, cfg.tasks)
        summaries = {task: mean_and_interval(values, ctx.seed) for task, values in per_example.items()}
        entry: dict[str, Any] = {
            "status": "evaluated",
            "folder": name,
            "spiking": any(True for _ in spiking.iter_neurons(model)),
            "params": sum(p.numel() for p in model.parameters()),
            "accuracy": {task: mean for task, (mean, _) in summaries.items()},
            "accuracy_ci95": {task: interval for task, (_, interval) in summaries.items()},  # percentile bootstrap
            "accuracy_per_example": per_example,  # per held-out prompt, in order: the paired comparisons use it
            "examples": [list(x) for x in zip(test_prompts["prompt"][:5], completions[:5], test_prompts["answer"][:5])],
            "perplexity": tasks.perplexity(model, blocks, cfg.eval_batch_size),
        }
        if cfg.energy:
            figures, stats = measure_energy(model, held_out, costs, cfg.energy_contexts)
            entry.update(figures)
            teacher_pj = (results.get("teacher", {}).get("energy_by_cost_model") or {}).get("pj_per_token", {})
            if stats is not None and memory_1.name in teacher_pj:
                # the overall firing rate at which this model would cost what the teacher does (batch-1 decode)
                entry["energy_by_cost_model"]["break_even_firing_rate"] = spiking.break_even(
                    teacher_pj[memory_1.name], model, stats, memory_1, context=entry["energy"]["context"]
                )
        if task_manager is not None:
            entry["lm_eval"], per_doc = lm_eval_scores(model, tokenizer, cfg.lm_eval, task_manager, cfg, ctx.seed)
            entry["lm_eval_headline"] = lm_eval_headline(entry["lm_eval"], cfg.lm_eval)
            entry["lm_eval_ci95"] = {task: mean_and_interval(values, ctx.seed)[1] for task, values in per_doc.items()}
            entry["lm_eval_per_doc"] = per_doc
            values = [v for v in entry["lm_eval_headline"].values() if v is not None]
            entry["lm_eval_average"] = sum(values) / len(values) if len(values) == len(cfg.lm_eval) else None
        entry["eval_s"] = round(time.perf_counter() - started, 2)
        results[name] = entry
        ctx.logger.info(
            "eval: %-8s accuracy %s, ppl %.3f%s", name, entry["accuracy"], entry["perplexity"],
            f", {entry['energy']['pj_per_token']:.4g} pJ/token" if cfg.energy else "",
        )
        del model
    for name in missing:
        results[name] = {"status": "missing", "reason": missing[name]}
        ctx.logger.info("eval: %-8s missing (%s)", name, missing[name])

    teacher = results.get("teacher", {})
    teacher_pj = teacher.get("energy", {}).get("pj_per_token")
    teacher_avg = teacher.get("lm_eval_average")
    for entry in results.values():
        if entry["status"] != "evaluated":
            continue
        if cfg.energy:
            # E_teacher / E_model on the same held-out tokens; None without an evaluated teacher
            entry["energy"]["ratio_to_teacher"] = teacher_pj / entry["energy"]["pj_per_token"] if teacher_pj else None
            entry["energy_by_cost_model"]["ratio_to_teacher"] = energy_ratios(entry, teacher)
            if "energy_by_context" in entry:
                entry["energy_by_context"]["ratio_to_teacher"] = context_ratios(entry, teacher)
        if task_manager is not None:
            # the paper's "zero-shot gap": teacher average minus this model's, in points
            average = entry["lm_eval_average"]
            entry["lm_eval_gap_to_teacher"] = (
                100 * (teacher_avg - average) if teacher_avg is not None and average is not None else None
            )

    comparisons = paired_comparisons(results, ctx)
    metrics_file = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "cost_table": spiking.HOROWITZ_45NM.describe() if cfg.energy else None,
        "cost_models": {name: cost.describe() for name, cost in costs.items()} if cfg.energy else None,
        "energy_contexts": list(cfg.energy_contexts) if cfg.energy else [],
        "memory_note": spiking.energy.MEMORY_NOTE,
        "tasks": list(cfg.tasks),
        "eval_samples": len(test_prompts),
        "max_new_tokens": budget,
        "held_out_tokens": {"blocks": len(blocks), "tokens": int(held_out.numel()), "source": "data/corpus test split"},
        # the baseline a language model must beat, on the same held-out positions as the perplexities
        "baselines": {"unigram_ppl": unigram_perplexity(corpus["train"], blocks, len(tokenizer))},
        "intervals": "95% percentile bootstrap, 2000 resamples of the held-out rows; paired for differences",
        "paired": comparisons,
        "lm_eval": {
            "tasks": list(cfg.lm_eval), "include_path": cfg.lm_eval_include_path, "limit": cfg.lm_eval_limit,
            "version": getattr(lm_eval, "__version__", None) if cfg.lm_eval else None,
        },
        "stages": {name: results[name] for name in MODEL_STAGES if name in results},
    }
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics_file, indent=1))
    if cfg.report:
        folder = build_report(ctx.run_dir, ctx.out_dir / "report", logger=ctx.logger)
        ctx.logger.info("eval: report in %s", folder / "report.md")
    return headline_metrics(metrics_file)


def paired_comparisons(results: dict[str, dict[str, Any]], ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Paired differences on the same held-out prompts, with 95% bootstrap intervals: every student
    against the teacher, and rl against its own input model (sparsify, or distill without it: the
    RL gain). {"<a>_vs_<b>": {task: {difference, ci95, n}}}."""
    evaluated = {name: e for name, e in results.items() if e["status"] == "evaluated"}
    pairs = [(name, "teacher") for name in evaluated if name != "teacher" and "teacher" in evaluated]
    rl_manifest = ctx.upstream.get("rl", ctx.run_dir / "rl") / "manifest.json"
    if "rl" in evaluated and rl_manifest.is_file():
        source = json.loads(rl_manifest.read_text()).get("metrics", {}).get("input_model")
        if source in evaluated:
            pairs.append(("rl", source))
    out = {}
    for a, b in pairs:
        by_task = {task: paired(values, evaluated[b]["accuracy_per_example"][task], ctx.seed)
                   for task, values in evaluated[a]["accuracy_per_example"].items()}
        out[f"{a}_vs_{b}"] = {"model": a, "baseline": b, **by_task}
    return out


def headline_metrics(metrics_file: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics: per stage accuracy, perplexity, firing rate, energy, ratio, params."""
    out: dict[str, Any] = {}
    for name, entry in metrics_file["stages"].items():
        if entry["status"] != "evaluated":
            out[f"{name}/status"] = "missing"
            continue
        first_task = next(iter(entry["accuracy"]))
        out[f"{name}/accuracy"] = entry["accuracy"][first_task]
        out[f"{name}/accuracy_ci95"] = entry["accuracy_ci95"][first_task]
        out[f"{name}/ppl"] = entry["perplexity"]
        if "energy" in entry:
            out[f"{name}/firing_rate"] = entry["firing_rate"]
            out[f"{name}/energy_pj_per_token"] = entry["energy"]["pj_per_token"]
            out[f"{name}/energy_ratio"] = entry["energy"]["ratio_to_teacher"]
            for model_name, ratio in (entry["energy_by_cost_model"].get("ratio_to_teacher") or {}).items():
                if model_name != spiking.HOROWITZ_45NM.name:
                    out[f"{name}/energy_ratio/{model_name}"] = ratio
            if entry["energy_by_cost_model"].get("break_even_firing_rate") is not None:
                out[f"{name}/break_even_firing_rate/45nm-memory"] = entry["energy_by_cost_model"]["break_even_firing_rate"]
            by_context = entry.get("energy_by_context") or {}
            for key, pj in by_context.get("pj_per_token", {}).items():  # 45nm-horowitz at c keys per token
                out[f"{name}/energy_pj_per_token_{key}"] = pj
                out[f"{name}/energy_ratio_{key}"] = (by_context.get("ratio_to_teacher") or {}).get(key)
        out[f"{name}/params"] = entry["params"]
        for task, value in (entry.get("lm_eval_headline") or {}).items():
            out[f"{name}/lm_eval/{task}"] = value
    return out
