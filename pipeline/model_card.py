"""The model card of a model stage's folder (README.md with HF model-card metadata) and the push
to the hub.

The runner (`_run_stage`) calls `write_model_card` for every model stage (`stages.MODEL_STAGES`)
after the stage returned and before it writes the manifest: the manifest stays the last file
written (its presence still means "done"), and the card is one of the stage's outputs, its size
recorded like the weights'. The card's figures are the metrics that manifest records; the stage
module names which of its metrics they are (`CARD_METRICS`). When the stage's config has
`push_to_hub: {repo_id, private}`, `push_folder` then uploads the folder with huggingface_hub's
`HfApi.create_repo` + `HfApi.upload_folder`, still before the manifest: a failed push leaves the
stage not done, and the same command retries it.

    from pipeline.model_card import build_model_card     # the runner's job; tests read the card
    card = build_model_card(recipe, "distill", fingerprint, metrics)   # huggingface_hub.ModelCard
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import spiking
from pipeline.manifest import ATTEMPT, MANIFEST, git_commit
from pipeline.recipe import Recipe

log = logging.getLogger("spikerl")

CARD = "README.md"
# What goes to the hub besides the model: not the checkpoints (optimizer state, the resume point),
# not the runner's bookkeeping, not training_args.bin (a pickle, which the hub flags as unsafe).
PUSH_IGNORE = ["checkpoints/*", ATTEMPT, MANIFEST, "training_args.bin", ".*"]

# card field -> (row label, how the value is shown); the order of the metrics table
_ROWS: dict[str, tuple[str, str]] = {
    "accuracy": ("task accuracy (greedy exact match on the held-out prompts)", "percent"),
    "teacher_accuracy": ("the teacher's accuracy on the same prompts", "percent"),
    "accuracy_before": ("accuracy of the input model, before this stage", "percent"),
    "perplexity": ("perplexity (held-out corpus blocks)", "number"),
    "firing_rate": ("firing rate (spikes per neuron per step)", "number"),
    "energy_pj_per_token": ("energy per token (pJ)", "energy"),
    "energy_ratio": ("energy ratio (teacher / this model, per token)", "ratio"),
}


class PushError(Exception):
    """The push of a stage's folder failed (network, credentials, quota); the message names the
    recipe field, the folder, the repo and the endpoint."""


# --------------------------------------------------------------------------------------------
# The card


def _show(value: float, how: str) -> str:
    if how == "percent":
        return f"{100 * value:.2f}%"
    if how == "energy":
        return f"{value:.0f}"
    if how == "ratio":
        return f"{value:.3f}x"
    return f"{value:.4g}"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _parameter_count(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files (tied weights stored once), or None."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                count = 1
                for size in f.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def _teacher_text(recipe: Recipe) -> tuple[str, str | None]:
    """(how the card names the teacher, its hub id for `base_model` or None)."""
    teacher = recipe.model.teacher
    if teacher.pretrained:
        hub_id = None if Path(teacher.pretrained).exists() else teacher.pretrained  # a local folder is no hub id
        return f"`{teacher.pretrained}` (pretrained)", hub_id
    arch = teacher.train_from_scratch
    if arch.architecture == "llama":
        return (
            f"a Llama Transformer trained from scratch by this run's teacher stage (hidden {arch.hidden_size}, "
            f"{arch.num_hidden_layers} layers, {arch.num_attention_heads} heads)"
        ), None
    mlp = f", gated MLP width {arch.intermediate_size}" if arch.intermediate_size else ""
    return (
        f"a Mamba trained from scratch by this run's teacher stage (hidden {arch.hidden_size}, "
        f"{arch.num_hidden_layers} blocks, state {arch.state_size}{mlp})"
    ), None


def _example_prompt(recipe: Recipe) -> str:
    """A held-out prompt of the run's data stage, for the generation example ("The" without one)."""
    prompts = recipe.run_dir / "data" / "prompts"
    try:
        from datasets import load_from_disk

        test = load_from_disk(str(prompts))["test"]
        return str(test[0]["prompt"]) if len(test) else "The"
    except (FileNotFoundError, KeyError, ValueError, IndexError):
        return "The"


def _lm_eval_line(recipe: Recipe, where: str, custom_code: bool) -> str:
    """lm-eval's command line for the folder, with the recipe's eval tasks (else two of the paper's)."""
    evaluate = recipe.stages.get("eval")
    tasks = ",".join(getattr(evaluate, "lm_eval", None) or ["lambada_openai", "hellaswag"])
    include = getattr(evaluate, "lm_eval_include_path", None)
    return (
        f"lm_eval --model hf --model_args pretrained={where}" + (",trust_remote_code=True" if custom_code else "")
        + f" --tasks {tasks}"
        + (f" --include_path {include}" if include else "")
        + " --batch_size 8"
    )


def _metric_rows(metrics: dict[str, Any], card_metrics: dict[str, str]) -> list[tuple[str, str, str, float]]:
    """(card field, label, shown value, raw value) for each card metric the stage measured."""
    rows = []
    for field, (label, how) in _ROWS.items():
        key = card_metrics.get(field)
        value = metrics.get(key) if key else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((field, label, _show(value, how), value))
    return rows


@dataclass
class _Folder:
    """What the card reads from a model folder: its config (an adapter's: its base's), the adapter."""

    path: Path
    config: dict[str, Any]
    adapter: dict[str, Any]
    base: Path | None  # an adapter's base model folder

    @classmethod
    def read(cls, path: Path) -> "_Folder":
        adapter = _read_json(path / "adapter_config.json")
        base = Path(adapter.get("base_model_name_or_path") or "") if adapter else None
        # an adapter folder (rl with lora.merge: false) is described by its base's architecture and neurons
        config = _read_json(path / "config.json") or (_read_json(base / "config.json") if base else {})
        return cls(path, config, adapter, base)

    @property
    def custom_code(self) -> bool:
        return "auto_map" in self.config

    @property
    def neurons(self) -> dict[str, dict]:
        return self.config.get("neurons") or {}


def _what_it_is(folder: _Folder, recipe: Recipe, metrics: dict[str, Any], card_metrics: dict[str, str]) -> list[str]:
    config, neurons = folder.config, folder.neurons
    cls = (config.get("architectures") or ["?"])[0]
    if folder.adapter:
        first = (f"A PEFT LoRA adapter (targets {sorted(folder.adapter.get('target_modules') or [])}) on the base "
                 f"model `{folder.base}`: the folder holds the adapter only; copy or push the base folder with it "
                 "(adapter_config.json names it). Below: the base's architecture and neurons.")
    elif folder.custom_code:
        kind = ("a Mamba language model with spiking neurons (integer spike counts times a per-channel threshold) "
                "on the inputs of its linear layers" if neurons else
                "a Mamba language model with a gated MLP per block and no neurons (no transformers class has that block)")
        first = (f"A `{cls}`: {kind}. The folder carries its modeling code (`modeling.py` and the files it imports), "
                 "so it loads without spikerl.")
    else:
        first = f"A `{cls}` (transformers' own class, no custom code, no neurons)."
    lines = ["## What it is", "", first, "", f"* teacher: {_teacher_text(recipe)[0]}"]
    if config and config.get("state_size") is None:  # a Transformer (a Llama teacher)
        lines.append(f"* size: hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
                     f"{config.get('num_attention_heads')} attention heads ({config.get('num_key_value_heads')} key/value), "
                     f"vocabulary {config.get('vocab_size')}, MLP width {config.get('intermediate_size')}")
    elif config:
        mlp = config.get("mlp_intermediate_size")
        lines.append(f"* size: hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} blocks, "
                     f"state {config.get('state_size')}, vocabulary {config.get('vocab_size')}"
                     + (f", gated MLP width {mlp}" if mlp else ""))
        if config.get("attention_layers"):
            lines.append(f"* kept attention layers {config['attention_layers']}: the teacher's own attention and "
                         "weights (a KV cache in generation); the other blocks' mixers start from its attention "
                         "weights, B and C projected from the block input (methods.md §13)")
    params = _parameter_count(folder.path)
    if params is not None:
        lines.append(f"* parameters stored: {params:,}")
    lines += ["", "Neurons per placement (the input of that linear layer):", ""]
    if not neurons:
        return lines + ["none: every layer is dense."]
    rate_key = card_metrics.get("firing_rate")
    rates = {p: metrics.get(f"{rate_key}/{p}") for p in neurons} if rate_key else {}
    rates = {p: r for p, r in rates.items() if isinstance(r, (int, float))}
    # the firing-rate column only when this stage measured it per placement
    lines += ["| placement | neuron | firing rate |", "| --- | --- | --- |"] if rates else ["| placement | neuron |", "| --- | --- |"]
    for placement in (p for p in spiking.PLACEMENTS if p in neurons):
        row = f"| {placement} | {spiking.NeuronSpec.of(neurons[placement]).describe()} |"
        lines.append(row + (f" {rates[placement]:.4f} |" if placement in rates else " — |" if rates else ""))
    return lines


def _metrics_section(name: str, rows: list[tuple[str, str, str, float]], samples: Any) -> list[str]:
    lines = ["## Metrics", "", f"From this stage's manifest (`{name}/manifest.json` of the run)"
             + (f", on {samples} held-out prompts" if samples else "") + ":", ""]
    if rows:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {label} | {shown} |" for _, label, shown, _ in rows]
    measured = {row[0] for row in rows}
    missing = [_ROWS[f][0] for f in ("perplexity", "firing_rate", "energy_pj_per_token") if f not in measured]
    if missing:
        lines += ["", "Not measured by this stage: " + "; ".join(missing) + "."]
    if "energy_pj_per_token" in measured:
        # the stages measure with spiking.measure's default table (as the eval stage reports it)
        lines += ["", f"Energy is an estimate: spikerl's operation counts (spiking/energy.py) times the cost table "
                  f"`{spiking.HOROWITZ_45NM.describe()}`; {spiking.energy.MEMORY_NOTE}. A linear layer fed by "
                  "spikes costs Σ|s|·n_out accumulates (AC) from the spike counts measured on held-out tokens; every "
                  "other op (conv1d, x_proj, dt_proj, the discretisation and the scan, the gate, norms, the LM head) "
                  "is counted dense. The spikes run as integer activations on ordinary hardware here, not on a "
                  "neuromorphic chip."]
    return lines


def _recipe_section(recipe: Recipe, name: str, fingerprint: str) -> list[str]:
    stage_yaml = yaml.safe_dump(recipe.stages[name].model_dump(mode="json"), sort_keys=False).rstrip()
    commit = git_commit()
    return ["## Recipe", "",
            f"Fingerprint `{fingerprint}`: a hash of this stage's config, the upstream stages' fingerprints, "
            "the recipe's `model` section, the seed and the code the stage ran"
            + (f" (git commit `{commit}`)" if commit else "") + ". The stage's section:", "",
            "```yaml", f"stages:\n  {name}:\n" + "\n".join("    " + line for line in stage_yaml.splitlines()), "```", "",
            "<details><summary>The whole resolved recipe (re-run it with <code>spikerl run recipe.yaml "
            f"--until {name}</code>)</summary>", "", "```yaml", recipe.to_yaml().rstrip(), "```", "", "</details>"]


def _loading_section(folder: _Folder, recipe: Recipe, where: str) -> list[str]:
    lines = ["## How to load and generate", ""]
    if folder.adapter:
        return lines + ["```python", "from peft import AutoPeftModelForCausalLM", "",
                        f'MODEL = "{where}"',
                        "model = AutoPeftModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True)"
                        "  # loads the base model named in adapter_config.json", "```"]
    if folder.custom_code:
        load = ["import spiking  # with spikerl installed: registers the classes",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'MODEL = "{where}"', "model = AutoModelForCausalLM.from_pretrained(MODEL)", "",
                "# without spikerl (torch, transformers and pydantic; triton / mamba-ssm optional): the code in this folder",
                "model = AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True)"]
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'MODEL = "{where}"', "model = AutoModelForCausalLM.from_pretrained(MODEL)"]
    lines += ["```python", *load, "", "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
              f"inputs = tokenizer([{_example_prompt(recipe)!r}], return_tensors=\"pt\")",
              "out = model.generate(**inputs, max_new_tokens=8, do_sample=False)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```"]
    if folder.neurons:
        lines += ["", "`spiking.load_deployed(MODEL)` gives the model as the stages measure it (SGC off, spikes on, "
                  "eval mode). Generation is recurrent: constant memory per token. PEFT LoRA: "
                  '`LoraConfig(target_modules=["in_proj", "x_proj", "dt_proj"])` adapts the projections, never a neuron.']
    return lines + ["", "lm-eval's command line:", "", "```bash", _lm_eval_line(recipe, where, folder.custom_code), "```"]


def build_model_card(recipe: Recipe, name: str, fingerprint: str, metrics: dict[str, Any]) -> ModelCard:
    """The card of `run_dir/<name>/`: what the model is (teacher, stage, neurons per placement),
    the recipe and fingerprint, the stage's metrics (`metrics`, what its manifest records) with the
    energy cost table and what it leaves out, and how to load and generate, with and without spikerl."""
    folder = _Folder.read(recipe.run_dir / name)
    module = recipe.modules[name]
    card_metrics: dict[str, str] = getattr(module, "CARD_METRICS", {})
    push = getattr(recipe.stages[name], "push_to_hub", None)
    where = push.repo_id if push is not None else str(folder.path)
    model_name = f"{recipe.run.name}-{name}"
    rows = _metric_rows(metrics, card_metrics)

    tags = ["spikerl", "mamba", f"spikerl-{name}"]
    if folder.custom_code:
        tags += (["spiking-neural-network"] if folder.neurons else []) + ["custom_code"]
    data = ModelCardData(
        library_name="peft" if folder.adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        base_model=_teacher_text(recipe)[1],
        model_name=model_name,
        eval_results=[
            EvalResult(task_type="text-generation", dataset_type="spikerl-held-out",
                       dataset_name=f"{recipe.run.name}: the data stage's held-out split",
                       metric_type=field, metric_value=value, metric_name=label)
            for field, label, _, value in rows
        ] or None,
    )
    summary = (module.__doc__ or f"{name} stage").strip().splitlines()[0]
    sections = [
        [f"# {model_name}", "", f"**{summary}** Made by spikerl's `{name}` stage of the run `{recipe.run.name}`."],
        _what_it_is(folder, recipe, metrics, card_metrics),
        _metrics_section(name, rows, metrics.get(card_metrics.get("samples", ""))),
        _recipe_section(recipe, name, fingerprint),
        _loading_section(folder, recipe, where),
    ]
    body = "\n\n".join("\n".join(section) for section in sections)
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + body + "\n")


def write_model_card(recipe: Recipe, name: str, fingerprint: str, metrics: dict[str, Any]) -> Path:
    """Write `run_dir/<name>/README.md` (the runner calls it before the stage's manifest)."""
    path = recipe.run_dir / name / CARD
    build_model_card(recipe, name, fingerprint, metrics).save(path)
    return path


# --------------------------------------------------------------------------------------------
# The push


def push_problems(repo: Any, where: str) -> list[str]:
    """What would stop a push, checked without the network (preflight): offline mode, no token."""
    from huggingface_hub import get_token, is_offline_mode

    if repo is None:
        return []
    if is_offline_mode():
        return [f"{where}: HF_HUB_OFFLINE is set, so {repo.repo_id} cannot be pushed (unset it, or drop push_to_hub)"]
    if get_token() is None:
        return [f"{where}: no Hugging Face token to push {repo.repo_id} with (set HF_TOKEN or run `hf auth login`)"]
    return []


def push_folder(folder: Path, repo: Any, where: str) -> str:
    """Upload `folder` (not its checkpoints or the runner's files, `PUSH_IGNORE`) to `repo`
    ({repo_id, private}), creating the repo when missing; returns the commit URL. Any failure is a
    PushError naming `where` (the recipe field), the folder, the repo and the endpoint."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo.repo_id, private=repo.private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(folder), ignore_patterns=PUSH_IGNORE,
            commit_message=f"spikerl: the {folder.name} stage's model",
        )
    except Exception as error:  # noqa: BLE001 - network, auth, quota, bad repo: all reported the same way, cause chained
        raise PushError(
            f"{where}: pushing {folder} to {repo.repo_id} at {api.endpoint} failed: {type(error).__name__}: {error}"
        ) from error
    log.info("%s: pushed %s to %s", where, folder, commit.commit_url)
    return str(commit.commit_url)
