"""The run report: every stage side by side, from the run folder's files alone.

    spikerl report runs/tiny                   # -> runs/tiny/eval/report/
    spikerl report runs/tiny --out /tmp/rep
    from stages.report import build_report; build_report("runs/tiny")

Reads `eval/metrics.json` (written by the eval stage: stages/evaluate.py), each stage's
`manifest.json` and each training stage's `train_log.json` (the Trainer's log history; TRL's for
rl). Writes `report.md`, `report.json` (the same figures, each with the file and key it was read
from) and PNG plots (matplotlib, optional: without it the plots are skipped and the report says
so):

* firing_rate_by_layer.png   firing rate per layer, one line per spiking stage
* energy_by_op.png           energy per token stacked by op kind (MAC / AC / Mul) and by op group
* training_curves.png        loss (and RL reward) against step, one panel per training stage
* accuracy_vs_energy.png     task accuracy against energy per token, one point per stage

Every number of ours comes from one of those files; the only constants are the papers'
reference figures (methods.md §8), printed in their own table and marked as the paper's. A stage
the eval stage did not evaluate is shown as missing, with the reason, never as zero.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from stages import MODEL_STAGES, STAGES

try:  # matplotlib is optional (`pip install 'spikerl[eval]'`): without it the report has no plots
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - matplotlib is in the dev extra
    plt = None

METRICS = "eval/metrics.json"

# The papers' figures (methods.md §8): shown beside ours, always labelled as the paper's.
PAPER = {
    "energy_ratio": {"value": 4.76, "what": "energy benefit E_teacher / E_student, SpikingMamba-1.3B (SpikingMamba paper)"},
    "zero_shot_gap": {"value": 4.78, "what": "zero-shot gap to the teacher after distillation, points, avg of 6 tasks (SpikingMamba paper)"},
    "zero_shot_gap_rl": {"value": 2.23, "what": "zero-shot gap to the teacher after RL, points (SpikingMamba paper)"},
    "teacher_average": {
        "value": {"130M": 44.7, "370M": 50.0, "790M": 57.1, "1.4B": 59.7},
        "what": "Mamba teacher, avg of LAMBADA, HellaSwag, PIQA, ARC-e, ARC-c, WinoGrande (Mamba paper)",
    },
}
# The zero-shot tasks of the SpikingMamba paper (and of the Mamba paper's teacher table): eval's default
PAPER_TASKS = ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande"]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


# column key -> (header, formatter); the accuracy / lm-eval columns are added per task
FORMATS: dict[str, Callable[[Any], str]] = {
    "accuracy": _pct,
    "interval": lambda v: f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]",  # a 95% interval of a rate, in points
    "lm_eval": _pct,
    "lm_eval_average": _pct,
    "perplexity": lambda v: f"{v:.3f}",
    "firing_rate": lambda v: f"{v:.4f}",
    "energy_pj_per_token": lambda v: f"{v:.0f}",
    "energy_ratio": lambda v: f"{v:.2f}x",
    "context": lambda v: f"{v:.1f}",  # keys attended per token
    "params": lambda v: f"{int(v)}",
    "points": lambda v: f"{v:.2f}",
}


def format_cell(kind: str, value: Any) -> str:
    """How the markdown shows a value of column kind `kind` (None: '-', dense firing rate: 'dense')."""
    if value is None:
        return "-"
    return FORMATS[kind](value)


# ------------------------------------------------------------------------------ reading


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def lookup(run_dir: Path, source: str) -> Any:
    """The value a report cell names: `"eval/metrics.json:stages.rl.perplexity"` -> that number."""
    file, _, key = source.partition(":")
    node = read_json(Path(run_dir) / file)
    for part in key.split(".") if key else []:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _cell(kind: str, metrics: dict, stage: str, *keys: str) -> dict[str, Any]:
    """{kind, value, source}: the value at stages.<stage>.<keys...> of eval/metrics.json (None if absent)."""
    node: Any = metrics["stages"][stage]
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return {"kind": kind, "value": node, "source": f"{METRICS}:" + ".".join(("stages", stage, *keys))}


def table_columns(metrics: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    """(header, kind, key path under stages.<stage>) of the side-by-side table."""
    columns = []
    for task in metrics["tasks"]:
        columns.append((f"accuracy ({task})", "accuracy", ("accuracy", task)))
        if any("accuracy_ci95" in e for e in metrics["stages"].values()):
            columns.append((f"95% CI ({task})", "interval", ("accuracy_ci95", task)))
    lm_tasks = metrics["lm_eval"]["tasks"] if any("lm_eval" in e for e in metrics["stages"].values()) else []
    for task in lm_tasks:
        columns.append((f"lm-eval {task}", "lm_eval", ("lm_eval_headline", task)))
        if any(task in (e.get("lm_eval_ci95") or {}) for e in metrics["stages"].values()):
            columns.append((f"95% CI (lm-eval {task})", "interval", ("lm_eval_ci95", task)))
    if len(lm_tasks) > 1:
        columns.append(("lm-eval avg", "lm_eval_average", ("lm_eval_average",)))
    columns += [
        ("perplexity", "perplexity", ("perplexity",)),
        ("firing rate", "firing_rate", ("firing_rate",)),
        ("energy pJ/token (45nm-horowitz)", "energy_pj_per_token", ("energy", "pj_per_token")),
        ("energy ratio 45nm-horowitz (teacher / stage)", "energy_ratio", ("energy", "ratio_to_teacher")),
        ("parameters", "params", ("params",)),
    ]
    return columns


def cost_model_columns(metrics: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    """(header, kind, key path under stages.<stage>) of the ratio-by-cost-model table (methods.md §10)."""
    names = list(metrics.get("cost_models") or {})
    if not names:
        return []
    by = ("energy_by_cost_model", "ratio_to_teacher")
    columns = [(f"ratio {names[0]} (fp32, compute)", "energy_ratio", (*by, names[0]))]
    columns.append(("ratio vs INT8 teacher (teacher 45nm-int8, stage 45nm-horowitz)", "energy_ratio", (*by, "int8-teacher")))
    columns += [(f"ratio {name}", "energy_ratio", (*by, name)) for name in names[1:]]
    columns.append(("firing rate", "firing_rate", ("firing_rate",)))
    columns.append(("break-even firing rate (45nm-memory, batch 1)", "firing_rate", ("energy_by_cost_model", "break_even_firing_rate")))
    return columns


def context_columns(metrics: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    """(header, kind, key path under stages.<stage>) of the energy-by-context table (methods.md §12):
    45nm-horowitz energy per token and the teacher / stage ratio at each of eval's `energy_contexts`."""
    contexts = metrics.get("energy_contexts") or []
    if not contexts:
        return []
    columns = [("held-out context (keys/token)", "context", ("energy", "context"))]
    for c in contexts:
        columns.append((f"pJ/token at {c} keys", "energy_pj_per_token", ("energy_by_context", "pj_per_token", f"ctx{c}")))
        columns.append((f"ratio at {c} keys (teacher / stage)", "energy_ratio", ("energy_by_context", "ratio_to_teacher", f"ctx{c}")))
    return columns


def stage_rows(metrics: dict) -> list[dict[str, Any]]:
    """One row per model stage: status (evaluated / missing + reason) and a cell per column."""
    rows = []
    for stage in MODEL_STAGES:
        entry = metrics["stages"].get(stage)
        if entry is None:
            rows.append({"stage": stage, "status": "missing", "reason": "not in the eval stage's models list"})
            continue
        if entry["status"] != "evaluated":
            rows.append({"stage": stage, "status": "missing", "reason": entry.get("reason", "")})
            continue
        cells = {header: _cell(kind, metrics, stage, *keys) for header, kind, keys in table_columns(metrics)}
        cost_cells = {header: _cell(kind, metrics, stage, *keys) for header, kind, keys in cost_model_columns(metrics)}
        context_cells = {header: _cell(kind, metrics, stage, *keys) for header, kind, keys in context_columns(metrics)}
        rows.append({"stage": stage, "status": "evaluated", "spiking": entry.get("spiking"), "cells": cells,
                     "cost_cells": cost_cells, "context_cells": context_cells,
                     "attention": (entry.get("energy_by_context") or {}).get("attention")})
    return rows


def training_summary(run_dir: Path, manifests: dict[str, dict | None]) -> list[dict[str, Any]]:
    """Per stage: wall time and steps (manifest), last logged loss / reward (train_log.json)."""
    rows = []
    for stage in STAGES:
        manifest = manifests.get(stage)
        if manifest is None:
            continue
        row: dict[str, Any] = {"stage": stage, "finished": manifest.get("finished"),
                               "wall_s": {"value": manifest.get("wall_s"), "source": f"{stage}/manifest.json:wall_s"}}
        if "steps" in (manifest.get("metrics") or {}):
            row["steps"] = {"value": manifest["metrics"]["steps"], "source": f"{stage}/manifest.json:metrics.steps"}
        history = read_json(run_dir / stage / "train_log.json") or []
        for key in ("loss", "reward"):
            logged = [(i, e) for i, e in enumerate(history) if isinstance(e.get(key), (int, float))]
            if logged:
                i, entry = logged[-1]
                row[f"last_{key}"] = {"value": entry[key], "step": entry.get("step"), "source": f"{stage}/train_log.json:{i}.{key}"}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ plots


def _plot_firing_by_layer(metrics: dict, path: Path) -> bool:
    spiking = {s: e for s, e in metrics["stages"].items() if e["status"] == "evaluated" and e.get("firing_rate_by_layer")}
    if not spiking:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage, entry in spiking.items():
        rates = entry["firing_rate_by_layer"]
        ax.plot(range(len(rates)), [r if r is not None else float("nan") for r in rates], marker="o", label=stage)
    ax.set_xlabel("layer")
    ax.set_ylabel("firing rate (nonzero spikes / element)")
    ax.set_title("Firing rate per layer (held-out blocks; teacher dense)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_energy(metrics: dict, path: Path) -> bool:
    stages = [s for s, e in metrics["stages"].items() if e["status"] == "evaluated" and "energy" in e]
    if not stages:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bottoms = [0.0] * len(stages)
    for kind, label in (("mac", "MAC (dense)"), ("ac", "AC (spike-driven, biases, residual)"), ("mul", "Mul (dense)")):
        values = [metrics["stages"][s]["energy"]["pj_by_kind"][kind] for s in stages]
        left.bar(stages, values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    left.set_ylabel("pJ per token")
    left.set_title("Energy per token by op kind")
    left.legend(fontsize=8)
    groups = sorted({g for s in stages for g in metrics["stages"][s]["energy"]["pj_by_group"]})
    bottoms = [0.0] * len(stages)
    for group in groups:
        values = [metrics["stages"][s]["energy"]["pj_by_group"].get(group, 0.0) for s in stages]
        right.bar(stages, values, bottom=bottoms, label=group)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    right.set_title("Energy per token by op group")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{metrics.get('cost_table')}; memory access not counted", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_training(run_dir: Path, path: Path) -> bool:
    logs = {s: read_json(run_dir / s / "train_log.json") for s in MODEL_STAGES}
    logs = {s: h for s, h in logs.items() if h}
    if not logs:
        return False
    fig, axes = plt.subplots(1, len(logs), figsize=(3.6 * len(logs), 3.2), squeeze=False)
    for ax, (stage, history) in zip(axes[0], logs.items()):
        for key in ("loss", "reward"):
            points = [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float)) and "step" in e]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("Training curves (train_log.json of each stage)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_accuracy_energy(metrics: dict, path: Path) -> bool:
    task = metrics["tasks"][0]
    points = [
        (s, e["energy"]["pj_per_token"], e["accuracy"].get(task))
        for s, e in metrics["stages"].items()
        if e["status"] == "evaluated" and "energy" in e and e["accuracy"].get(task) is not None
    ]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stage, energy, accuracy in points:
        ax.scatter(energy, 100 * accuracy)
        ax.annotate(stage, (energy, 100 * accuracy), textcoords="offset points", xytext=(5, 5))
    ax.margins(0.2)  # room for the labels
    ax.set_xlabel("energy per token (pJ)")
    ax.set_ylabel(f"accuracy {task} (%)")
    ax.set_title("Accuracy vs energy per token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: dict[str, Any]) -> str:
    metrics_info = report["eval"]
    lines = [f"# Run report: {report['run_dir']}", ""]
    machine = metrics_info["machine"]
    lines += [
        f"Measured {metrics_info['date']} on {machine['device']} ({machine['processor']}, {machine['cpu_count']} CPUs, "
        f"{machine['platform']}, torch {machine['torch']}); report written {report['generated']}.",
        "",
        f"Task accuracy: greedy decoding (recurrent path) of {metrics_info['eval_samples']} held-out prompts. "
        f"Perplexity, firing rates and energy: the same {metrics_info['held_out_tokens']['tokens']} held-out corpus tokens "
        f"({metrics_info['held_out_tokens']['blocks']} blocks) for every model. Energy in this table and the "
        f"op-group breakdown: {metrics_info['cost_table']}; **memory access not counted** (compute only, the papers' "
        "convention); the memory-inclusive and INT8 figures are in \"Energy by cost model\" below.",
        "",
        "## Stages side by side",
        "",
    ]
    headers = report["columns"]
    rows = []
    for row in report["rows"]:
        if row["status"] != "evaluated":
            rows.append([row["stage"]] + ["missing"] + ["-"] * (len(headers) - 1))
            continue
        cells = []
        for header in headers:
            cell = row["cells"][header]
            cells.append("dense" if cell["kind"] == "firing_rate" and not row["spiking"] else format_cell(cell["kind"], cell["value"]))
        rows.append([row["stage"]] + cells)
    lines += _md_table(["stage"] + headers, rows)
    missing = [r for r in report["rows"] if r["status"] != "evaluated"]
    if missing:
        lines += ["", "Missing stages (not evaluated, not zero): " + "; ".join(f"{r['stage']}: {r['reason']}" for r in missing) + "."]

    if report.get("baselines"):
        unigram = report["baselines"].get("unigram_ppl")
        if unigram is not None:
            lines += ["", f"Baseline perplexity on the same held-out tokens: unigram (training-corpus token frequencies, "
                          f"add-one smoothing) {unigram:.3f}."]
    if report.get("paired"):
        lines += ["", "## Paired differences", "",
                  "Accuracy of a model minus its baseline's on the same held-out prompts (points), with the 95% "
                  "percentile-bootstrap interval of the paired difference (2000 resamples of the prompts).", ""]
        body = []
        for comparison in report["paired"].values():
            for task, value in comparison.items():
                if task in ("model", "baseline") or value is None:
                    continue
                lo, hi = value["ci95"]
                body.append([comparison["model"], comparison["baseline"], task, f"{100 * value['difference']:+.1f}",
                             f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", str(value["n"])])
        lines += _md_table(["model", "baseline", "task", "difference (points)", "95% CI", "prompts"], body)

    if report["cost_model_columns"]:
        lines += ["", "## Energy by cost model", "",
                  "E_teacher / E_stage on the same held-out tokens under each cost model (methods.md §8, §10); the "
                  "break-even firing rate is the overall firing rate at which the stage would cost what the teacher "
                  "does under 45nm-memory at batch 1 (its measured spike counts scaled; - when even zero spikes cost more).", ""]
        body = []
        for row in report["rows"]:
            if row["status"] != "evaluated" or not row["spiking"]:
                continue
            body.append([row["stage"]] + [format_cell(c["kind"], c["value"]) for c in row["cost_cells"].values()])
        lines += _md_table(["stage"] + report["cost_model_columns"], body)
        lines += [""] + [f"* `{name}`: {text}" for name, text in report["eval"]["cost_models"].items()]

    if report.get("context_columns"):
        lines += ["", "## Energy per token by context length", "",
                  "45nm-horowitz (compute only) with every attention layer attending c keys per token (methods.md §12): "
                  "the same spike counts, recosted. An attention layer's cost grows linearly with c, a Mamba layer's "
                  "does not, so an attention-free stage shows the same value at every c. The held-out context is the "
                  "one the figures above use (the causal mean over the held-out tokens; - without attention).", ""]
        body = []
        for row in report["rows"]:
            if row["status"] != "evaluated" or not row.get("context_cells"):
                continue
            kind = "attention" if row.get("attention") else "Mamba only"
            body.append([row["stage"], kind] + [format_cell(c["kind"], c["value"]) for c in row["context_cells"].values()])
        lines += _md_table(["stage", "layers"] + report["context_columns"], body)

    lines += ["", "## Beside the papers", "",
              "The right column is the papers' (methods.md §8), at 130 M-1.4 B parameters; ours are this run's.", ""]
    paper_rows = []
    for row in report["paper_comparison"]:
        ours = "; ".join(f"{o['stage']}: {format_cell(o['kind'], o['value'])}" for o in row["ours"]) or row["why_not"]
        paper = row["paper"]
        paper_text = ", ".join(f"{k} {v}" for k, v in paper.items()) if isinstance(paper, dict) else f"{paper}"
        paper_rows.append([row["figure"], ours, f"{paper_text} (paper)"])
    lines += _md_table(["figure", "ours", "paper"], paper_rows)

    energy = report["energy_by_group"]
    if energy["stages"]:
        lines += ["", "## Energy per token by op group (pJ)", ""]
        # a group a model does not have (the teacher's neurons) is "-", not 0
        body = [[g] + [f"{energy['values'][s][g]:.0f}" if g in energy["values"][s] else "-" for s in energy["stages"]]
                for g in energy["groups"]]
        lines += _md_table(["op group"] + energy["stages"], body)
        lines += [""] + [
            f"* {s}: spike-driven (accumulate only) {', '.join(energy['spike_driven'][s]) or 'none'}; everything else dense."
            for s in energy["stages"]
        ]

    layers = report["firing_rate_by_layer"]
    if layers["stages"]:
        lines += ["", "## Firing rate per layer", ""]
        n = max(len(layers["values"][s]) for s in layers["stages"])
        body = [[str(i)] + [format_cell("firing_rate", (layers["values"][s] + [None] * n)[i]) for s in layers["stages"]] for i in range(n)]
        lines += _md_table(["layer"] + layers["stages"], body)

    lines += ["", "## Training", ""]
    body = []
    for row in report["training"]:
        def value(key, fmt):
            return fmt(row[key]["value"]) if key in row and row[key]["value"] is not None else "-"
        body.append([row["stage"], value("steps", str), value("wall_s", lambda v: f"{v:.1f}"),
                     value("last_loss", lambda v: f"{v:.4f}"), value("last_reward", lambda v: f"{v:.4f}"), row.get("finished") or "-"])
    lines += _md_table(["stage", "steps", "wall s", "last logged loss", "last logged reward", "finished"], body)

    lines += ["", "## Plots", ""]
    if report["plots_skipped"]:
        lines.append(report["plots_skipped"])
    for name, caption in report["plots"].items():
        lines += [f"![{caption}]({name})", ""]
    lines += ["", f"Sources: {METRICS}, <stage>/manifest.json, <stage>/train_log.json (report.json names the file and key of every number)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ entry point


def paper_comparison(metrics: dict) -> list[dict[str, Any]]:
    """Our figures beside the paper's: energy benefit, zero-shot gaps, teacher average."""
    evaluated = {s: e for s, e in metrics["stages"].items() if e["status"] == "evaluated"}
    paper_tasks = sorted(metrics["lm_eval"]["tasks"]) == sorted(PAPER_TASKS)

    def ours(kind: str, stages, *keys):
        return [_cell(kind, metrics, s, *keys) | {"stage": s} for s in stages if s in evaluated]

    students = [s for s in MODEL_STAGES if s != "teacher"]
    tasks = metrics["lm_eval"]["tasks"]
    why_not = "not measured: " + (
        f"lm-eval ran {', '.join(tasks)}, not the paper's six tasks" if tasks else "no lm-eval tasks in stages.eval.lm_eval"
    )
    rows = [
        {"figure": "energy benefit E_teacher / E_stage (45nm-horowitz, compute only: the papers' convention)", "paper": f"{PAPER['energy_ratio']['value']}x SpikingMamba-1.3B",
         "ours": [c for c in ours("energy_ratio", students, "energy", "ratio_to_teacher") if c["value"] is not None]},
        {"figure": "zero-shot gap to the teacher after distillation (points, 6 tasks)", "paper": PAPER["zero_shot_gap"]["value"],
         "ours": ours("points", ["distill", "sparsify"], "lm_eval_gap_to_teacher") if paper_tasks else []},
        {"figure": "zero-shot gap to the teacher after RL (points)", "paper": PAPER["zero_shot_gap_rl"]["value"],
         "ours": ours("points", ["rl"], "lm_eval_gap_to_teacher") if paper_tasks else []},
        {"figure": "teacher, avg of the 6 zero-shot tasks", "paper": PAPER["teacher_average"]["value"],
         "ours": ours("lm_eval_average", ["teacher"], "lm_eval_average") if paper_tasks else []},
    ]
    for row in rows:
        row["why_not"] = "not measured: no spiking stage was evaluated with energy" if row["figure"].startswith("energy") else why_not
    return rows


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, logger: logging.Logger | None = None) -> Path:
    """Write report.md, report.json and the PNG plots of the run in `run_dir`; returns the folder.

    Needs `run_dir/eval/metrics.json` (the eval stage's); raises FileNotFoundError naming it.
    """
    logger = logger or logging.getLogger("spikerl.report")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    metrics = read_json(run_dir / METRICS)
    if metrics is None:
        raise FileNotFoundError(
            f"{run_dir / METRICS}: no eval metrics; run the eval stage first (spikerl run RECIPE --only eval, "
            "with a stages.eval section in the recipe)"
        )
    out = Path(out_dir) if out_dir is not None else run_dir / "eval" / "report"
    out.mkdir(parents=True, exist_ok=True)
    manifests = {stage: read_json(run_dir / stage / "manifest.json") for stage in STAGES}

    evaluated = {s: e for s, e in metrics["stages"].items() if e["status"] == "evaluated"}
    with_energy = [s for s in MODEL_STAGES if s in evaluated and "energy" in evaluated[s]]
    groups = sorted({g for s in with_energy for g in evaluated[s]["energy"]["pj_by_group"]})
    spiking_stages = [s for s in MODEL_STAGES if s in evaluated and evaluated[s].get("firing_rate_by_layer")]
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "eval": {k: metrics.get(k) for k in ("date", "machine", "cost_table", "cost_models", "energy_contexts", "memory_note",
                                             "tasks", "eval_samples", "held_out_tokens", "lm_eval")},
        "columns": [header for header, _, _ in table_columns(metrics)],
        "cost_model_columns": [header for header, _, _ in cost_model_columns(metrics)],
        "context_columns": [header for header, _, _ in context_columns(metrics)],
        "rows": stage_rows(metrics),
        "paper": PAPER,
        "paper_comparison": paper_comparison(metrics),
        "baselines": metrics.get("baselines"),  # eval/metrics.json:baselines
        "paired": metrics.get("paired"),  # eval/metrics.json:paired
        "energy_by_group": {
            "stages": with_energy, "groups": groups,
            "values": {s: evaluated[s]["energy"]["pj_by_group"] for s in with_energy},
            "spike_driven": {s: evaluated[s]["energy"]["spike_driven_ops"] for s in with_energy},
            "source": f"{METRICS}:stages.<stage>.energy.pj_by_group",
        },
        "firing_rate_by_layer": {
            "stages": spiking_stages,
            "values": {s: evaluated[s]["firing_rate_by_layer"] for s in spiking_stages},
            "source": f"{METRICS}:stages.<stage>.firing_rate_by_layer",
        },
        "training": training_summary(run_dir, manifests),
        "plots": {},
        "plots_skipped": None,
    }

    if plt is None:
        report["plots_skipped"] = "Plots skipped: matplotlib is not installed (pip install 'spikerl[eval]')."
        logger.warning("report: %s", report["plots_skipped"])
    else:
        for name, caption, draw in (
            ("firing_rate_by_layer.png", "firing rate per layer per stage", lambda p: _plot_firing_by_layer(metrics, p)),
            ("energy_by_op.png", "energy per token by op kind and op group", lambda p: _plot_energy(metrics, p)),
            ("training_curves.png", "training curves", lambda p: _plot_training(run_dir, p)),
            ("accuracy_vs_energy.png", "accuracy vs energy per token", lambda p: _plot_accuracy_energy(metrics, p)),
        ):
            if draw(out / name):
                report["plots"][name] = caption

    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
    return out
