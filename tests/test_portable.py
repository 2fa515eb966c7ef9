"""Models that travel: every model stage's folder of a finished tiny run (the real runner; a
Mamba+MLP teacher, so the teacher is a SpikingMamba folder too) loads and generates where spikerl
is not installed, after being copied elsewhere; its code files import only torch, transformers
and pydantic outside guards; PEFT's standard LoRA target list trains a distilled and a sparsified
(ATMN) student's adapters and nothing else; lm-eval's own command line scores a stage folder with
trust_remote_code=True and the local task; every folder has a model card built from its
manifest; push_to_hub goes through huggingface_hub's upload API up to the network and fails
there with a clear error, leaving the stage not done.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_portable.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import spiking
from pipeline import UserError
from pipeline.model_card import CARD, PUSH_IGNORE, PushError, push_folder
from pipeline.recipe import RecipeError, load_recipe
from pipeline.runner import run_recipe
from stages import distill, rl, sparsify, teacher
from stages.context import HubRepo

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "distill", "sparsify", "rl")
STAGE_MODULES = {"teacher": teacher, "distill": distill, "sparsify": sparsify, "rl": rl}
UNREACHABLE = "http://127.0.0.1:9"  # the discard port on loopback: connection refused, no real server

RECIPE = {
    "run": {"name": "travel", "seed": 0},
    "model": {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 2, "state_size": 4,
                                                  "intermediate_size": 16}}},
    "stages": {
        "data": {"source": {"synthetic": "arithmetic", "digits": [2], "num_problems": 300}, "test_size": 16,
                 "rl_prompts": 8, "seq_len": 12},
        "teacher": {"max_steps": 4, "batch_size": 8, "logging_steps": 1, "eval_samples": 8, "eval_blocks": 4},
        "distill": {"max_steps": 4, "batch_size": 8, "logging_steps": 1, "eval_samples": 8, "eval_blocks": 4},
        "sparsify": {"modules": {"in_proj": {"kind": "atmn", "T": 2}, "x_proj": {"kind": "atmn", "T": 2},
                                 "mlp.up": {"kind": "atmn", "T": 2}},
                     "max_steps": 2, "batch_size": 4, "logging_steps": 1, "eval_samples": 8, "eval_blocks": 4,
                     "calibration_batches": 1},
        "rl": {"algo": "grpo", "eval_samples": 8,
               "trl": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                       "max_completion_length": 4, "logging_steps": 1}},
    },
}

# Run in a fresh interpreter whose `import spiking` fails (a stub package first on PYTHONPATH, as
# triton's): loads each folder with the code it carries and writes what it computed.
WITHOUT_SPIKERL = r'''
import json, sys
try:
    import spiking
except ImportError as error:
    blocked = str(error)
else:
    raise SystemExit("spiking imported: the test would check nothing")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out_file, prompts = sys.argv[1], json.loads(sys.argv[2])
results = {"blocked": blocked}
for folder in sys.argv[3:]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    results[folder] = {"class": type(model).__module__ + "." + type(model).__name__,
                       "logits": logits.flatten().tolist(), "generated": generated.tolist()}
results["spiking_modules"] = sorted(m for m in sys.modules if m == "spiking" or m.startswith("spiking."))
json.dump(results, open(out_file, "w"))
'''


def write_recipe(folder: Path, run_dir: Path, **stage_overrides) -> Path:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["run"]["output_dir"] = str(run_dir)
    for stage, extra in stage_overrides.items():
        recipe["stages"][stage].update(extra)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run through the real runner: data, teacher (Mamba+MLP), distill, sparsify
    (ATMN on in_proj, x_proj, mlp.up), rl (GRPO); about 10 s on 2 cores."""
    root = tmp_path_factory.mktemp("travel")
    run_recipe(load_recipe(write_recipe(root, root / "run")))
    return root / "run"


@pytest.fixture(scope="module")
def blocked(tmp_path_factory) -> Path:
    """A PYTHONPATH entry whose `spiking` and `triton` packages raise ImportError on import."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in ("spiking", "triton"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here (test stub)')\n")
    return folder


def prompts(run_dir: Path, n: int = 3) -> list[str]:
    return list(load_from_disk(str(run_dir / "data" / "prompts"))["test"]["prompt"][:n])


def without_spikerl_env(blocked: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return env | {
        "PYTHONPATH": str(blocked),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),  # transformers copies remote code here
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


# ----------------------------------------------------------------------------- self-contained folders


def test_folders_load_and_generate_without_spikerl_after_a_copy(run_dir, blocked, tmp_path):
    moved = tmp_path / "elsewhere"
    copies = [shutil.copytree(run_dir / s, moved / s, ignore=shutil.ignore_patterns("checkpoints")) for s in STAGES]
    texts = prompts(run_dir)
    out_file = tmp_path / "out.json"
    script = tmp_path / "load.py"
    script.write_text(WITHOUT_SPIKERL)
    done = subprocess.run(
        [sys.executable, str(script), str(out_file), json.dumps(texts), *map(str, copies)],
        cwd=tmp_path, env=without_spikerl_env(blocked, tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out_file.read_text())
    assert "not installed here" in results["blocked"] and results["spiking_modules"] == []

    for copy in copies:
        got = results[str(copy)]
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith(".SpikingMambaForCausalLM")
        # the same folder with spikerl imported (its registered classes): the same numbers
        tokenizer = AutoTokenizer.from_pretrained(copy)
        model = AutoModelForCausalLM.from_pretrained(copy).eval()
        assert type(model) is spiking.SpikingMambaForCausalLM
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        diff = (torch.tensor(got["logits"]) - logits.flatten()).abs().max().item()
        print(copy.name, "max |logits difference| with and without spikerl:", diff)
        assert diff <= 1e-5
        assert got["generated"] == generated.tolist()
        assert generated.shape[1] > inputs["input_ids"].shape[1]  # it generated new tokens


@pytest.mark.parametrize("stage", STAGES)
def test_copied_code_is_complete_and_needs_only_torch_transformers_pydantic(run_dir, stage):
    """What transformers' hub loader checks file by file (check_imports): every import outside a
    try block is installed. The files are exactly modeling.py and what it reaches by relative imports."""
    folder = run_dir / stage
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling.SpikingMambaConfig",
                                  "AutoModelForCausalLM": "modeling.SpikingMambaForCausalLM"}
    code = {p.name for p in folder.glob("*.py")}
    reached = {Path(p).name for p in get_relative_import_files(str(folder / "modeling.py"))}
    assert code == {"modeling.py"} | reached, code ^ ({"modeling.py"} | reached)
    assert {"neurons.py", "kernels.py", "scan.py", "neuron_gate.py", "triton_scan.py", "triton_neurons.py"} <= code
    allowed = {"torch", "transformers", "pydantic"} | set(sys.stdlib_module_names)
    for name in sorted(code):
        extra = set(get_imports(str(folder / name))) - allowed
        assert not extra, f"{name} imports {extra} outside a guard"


# ----------------------------------------------------------------------------- PEFT's standard targets


@pytest.mark.parametrize("stage", ["distill", "sparsify"])
def test_lora_with_mamba_targets_trains_only_the_adapter(run_dir, stage):
    model = AutoModelForCausalLM.from_pretrained(run_dir / stage)
    neurons = dict(spiking.iter_neurons(model))
    kinds = {n.kind for n in neurons.values()}
    assert kinds == ({"si_lif"} if stage == "distill" else {"si_lif", "atmn"}), kinds
    if stage == "sparsify":  # a neuron sits before x_proj too: the list names it and must not match it
        assert any(name.endswith("x_proj_input") for name in neurons)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj", "dt_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    assert sorted({name.rsplit(".", 1)[-1] for name in wrapped}) == ["dt_proj", "in_proj", "x_proj"]
    assert len(wrapped) == 3 * model.config.num_hidden_layers

    tokenizer = AutoTokenizer.from_pretrained(run_dir / stage)
    test = load_from_disk(str(run_dir / "data" / "prompts"))["test"]
    batch = tokenizer([p + a for p, a in zip(test["prompt"][:4], test["answer"][:4])], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    print(stage, "moved:", len(moved), "of", len(before))
    assert any("lora_B" in n for n in moved), moved  # lora_B starts at 0: the first step moves it
    assert moved and all("lora_" in n for n in moved), [n for n in moved if "lora_" not in n]


# ----------------------------------------------------------------------------- lm-eval's command line


def test_lm_eval_cli_scores_a_stage_folder_with_remote_code(run_dir, blocked, tmp_path):
    """`lm-eval run --model hf --model_args pretrained=FOLDER,trust_remote_code=True` with the local
    task, in a process where spikerl does not import: lm-eval loads the folder's own code."""
    pytest.importorskip("lm_eval")
    output = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={run_dir / 'sparsify'},trust_remote_code=True,dtype=float32",
         "--tasks", "arith_mc", "--include_path", str(ROOT / "recipes" / "lm_eval_tasks"),
         "--device", "cpu", "--batch_size", "8", "--limit", "8", "--output_path", str(output)],
        cwd=tmp_path, env=without_spikerl_env(blocked, tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    files = list(output.rglob("results_*.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())
    acc = results["results"]["arith_mc"]["acc,none"]
    print("lm-eval arith_mc acc of the sparsified student (8 problems):", acc)
    assert 0.0 <= acc <= 1.0
    assert results["n-samples"]["arith_mc"]["effective"] == 8
    model_args = results["config"]["model_args"]
    assert model_args["trust_remote_code"] is True and model_args["pretrained"] == str(run_dir / "sparsify")


# ----------------------------------------------------------------------------- model cards


@pytest.mark.parametrize("stage", STAGES)
def test_every_model_folder_has_a_card_built_from_its_manifest(run_dir, stage):
    folder = run_dir / stage
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outputs"][CARD] == (folder / CARD).stat().st_size  # an output, written before the manifest
    card = ModelCard.load(folder / CARD)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"spikerl", f"spikerl-{stage}", "custom_code"} <= set(card.data.tags)
    # every figure in the metadata is the manifest's number for the metric the stage names
    card_metrics = STAGE_MODULES[stage].CARD_METRICS
    shown = {result.metric_type: result.metric_value for result in card.data.eval_results}
    expected = {field: manifest["metrics"][key] for field, key in card_metrics.items()
                if field != "samples" and key in manifest["metrics"]}
    assert shown == expected and "accuracy" in shown
    text = card.text
    assert manifest["fingerprint"] in text
    assert "from_pretrained(MODEL)" in text and "from_pretrained(MODEL, trust_remote_code=True)" in text
    assert "import spiking" in text and "model.generate(" in text
    neurons = json.loads((folder / "config.json").read_text())["neurons"]
    for placement, spec in neurons.items():
        assert f"| {placement} | {spiking.NeuronSpec.of(spec).describe()} |" in text
    if "energy_pj_per_token" in shown:
        assert spiking.HOROWITZ_45NM.describe() in text and spiking.energy.MEMORY_NOTE in text
    if stage == "teacher":
        assert not neurons and "every layer is dense" in text
    if stage == "sparsify":
        assert set(neurons) == {"in_proj", "x_proj", "out_proj", "mlp.up"}


def test_an_rl_adapter_folder_has_a_card_naming_its_base(run_dir, tmp_path):
    """rl with `lora.merge: false` saves the adapter alone: its card says so, names the base folder
    and shows the base's neurons, and loads it with peft."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    path = write_recipe(tmp_path, copy, rl={"lora": {"r": 2, "merge": False}})
    assert run_recipe(load_recipe(path), only="rl") == {"rl": "ran"}
    card = ModelCard.load(copy / "rl" / CARD)
    assert card.data.library_name == "peft" and (copy / "rl" / "adapter_model.safetensors").is_file()
    assert f"on the base model `{copy / 'sparsify'}`" in card.text
    assert "AutoPeftModelForCausalLM.from_pretrained(MODEL" in card.text
    assert "| x_proj | atmn T=2 tau=1.0 |" in card.text  # the base's neurons


def test_a_rerun_skips_every_stage_the_cards_included(run_dir):
    """The card is recorded in `outputs` like the weights: preflight's damaged-output check passes."""
    path = run_dir.parent / "recipe.yaml"
    assert set(run_recipe(load_recipe(path)).values()) == {"skipped"}


# ----------------------------------------------------------------------------- push_to_hub


def test_push_to_hub_field_is_checked_in_the_recipe(tmp_path):
    path = write_recipe(tmp_path, tmp_path / "run", distill={"push_to_hub": {"repo_id": "not a repo id"}})
    with pytest.raises(RecipeError, match=r"stages\.distill\.push_to_hub\.repo_id: .*Repo id must use"):
        load_recipe(path)
    assert load_recipe(write_recipe(tmp_path, tmp_path / "run")).stages["rl"].push_to_hub is None  # off by default
    repo = load_recipe(write_recipe(tmp_path, tmp_path / "run", rl={"push_to_hub": {"repo_id": "me/x"}})).stages["rl"].push_to_hub
    assert (repo.repo_id, repo.private) == ("me/x", True)


def test_push_uploads_the_model_not_the_run_bookkeeping(run_dir):
    from huggingface_hub.utils import filter_repo_objects  # what upload_folder filters with

    files = [p.relative_to(run_dir / "sparsify").as_posix() for p in (run_dir / "sparsify").rglob("*") if p.is_file()]
    assert any(f.startswith("checkpoints/") for f in files)  # there is something to leave out
    pushed = set(filter_repo_objects(files, ignore_patterns=PUSH_IGNORE))
    assert {"config.json", "model.safetensors", "modeling.py", "neurons.py", "README.md", "tokenizer.json"} <= pushed
    assert not {f for f in pushed if f.startswith("checkpoints/")}
    assert not pushed & {"attempt.json", "manifest.json", "training_args.bin"}


def test_push_stops_at_the_network_with_a_clear_error(run_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # reach the network step even under HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    with pytest.raises(PushError) as err:
        push_folder(run_dir / "distill", HubRepo(repo_id="someone/travel-distill"), "stages.distill.push_to_hub")
    message = str(err.value)
    print(message)
    assert message.startswith(f"stages.distill.push_to_hub: pushing {run_dir / 'distill'} to someone/travel-distill "
                              f"at {UNREACHABLE} failed: ")
    assert "ConnectError" in message


def test_a_failed_push_leaves_the_stage_not_done(run_dir, tmp_path, monkeypatch):
    """The runner pushes after the card and before the manifest: the stage trained and its card is
    written, but without a manifest it is not done, and the same command retries."""
    import huggingface_hub

    copy = shutil.copytree(run_dir, tmp_path / "run")
    path = write_recipe(tmp_path, copy, distill={"push_to_hub": {"repo_id": "someone/travel-distill", "private": True}})
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    with pytest.raises(UserError, match=r"stages\.distill\.push_to_hub: pushing .* at http://127\.0\.0\.1:9 failed: "
                                         r".*the stage is not marked done"):
        run_recipe(load_recipe(path), only="distill")
    assert not (copy / "distill" / "manifest.json").exists()
    assert (copy / "distill" / CARD).is_file() and (copy / "distill" / "model.safetensors").is_file()
    assert "someone/travel-distill" in (copy / "distill" / CARD).read_text()  # the card shows where it goes


def test_preflight_refuses_a_push_it_cannot_make(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    copy = shutil.copytree(run_dir, tmp_path / "run")
    path = write_recipe(tmp_path, copy, distill={"push_to_hub": {"repo_id": "someone/travel-distill"}})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))  # get_token(): none
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"stages\.distill\.push_to_hub: no Hugging Face token"):
        run_recipe(load_recipe(path), only="distill")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"stages\.distill\.push_to_hub: HF_HUB_OFFLINE is set"):
        run_recipe(load_recipe(path), only="distill")
    assert (copy / "distill" / "manifest.json").exists()  # refused before anything was touched
