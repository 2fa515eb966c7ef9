"""recipes/smoke-130m.yaml's code path at the real width and vocabulary, in minutes.

The recipe as shipped runs mamba-130m's shape (24 blocks); here it runs with 2 of the 24 blocks (same
d_model 768, vocabulary 50,280, the GPT-NeoX-20B tokenizer), short sequences, and a real-text corpus
that every machine has: files of Python's standard library (docstrings and code). Every stage runs
through the CLI; the models load and generate with the 50 k vocabulary.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import spiking  # noqa: F401  registers SpikingMamba with AutoModelForCausalLM
from pipeline.__main__ import main
from pipeline.manifest import read_manifest
from pipeline.recipe import load_recipe
from pipeline.runner import inspect_run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smoke-130m.yaml"
spec = importlib.util.spec_from_file_location("make_local_teacher", ROOT / "scripts" / "make_local_teacher.py")
make_local_teacher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_local_teacher)


@pytest.mark.slow
def test_every_stage_runs_at_the_130m_width_and_vocabulary(tmp_path, gpt_neox_tokenizer):
    teacher = make_local_teacher.main(["--shape", "mamba-130m", "--layers", "2", "--out", str(tmp_path / "teacher")])
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        f"model.teacher.pretrained={teacher}",
        f"model.tokenizer={gpt_neox_tokenizer}",
        f"stages.data.source.text_folder={sysconfig.get_paths()['stdlib']}",
        "stages.data.source.glob=[json/*.py, email/*.py, logging/*.py, http/*.py, importlib/*.py, unittest/*.py]",
        "stages.data.source.max_documents=80",
        "stages.data.seq_len=64",
        "stages.distill.max_steps=2",
        "stages.sparsify.max_steps=1",
        "stages.rl.trl.max_steps=1",
    ]
    assert main(["run", str(RECIPE), *overrides]) == 0
    recipe = load_recipe(RECIPE, overrides)
    states = inspect_run(recipe)
    assert {name: str(state.state) for name, state in states.items()} == {s: "done" for s in recipe.stages}

    run_dir = tmp_path / "run"
    assert len(AutoTokenizer.from_pretrained(run_dir / "data" / "tokenizer")) == 50277
    for stage in ("distill", "sparsify", "rl"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / stage)
        assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (50280, 768, 2)
        assert model.get_output_embeddings().weight.shape == (50280, 768)
    with torch.no_grad():
        out = model.generate(torch.tensor([[12092, 1533]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 5)
    evaluated = read_manifest(run_dir / "eval")["metrics"]
    for stage in ("teacher", "distill", "sparsify", "rl"):
        assert evaluated[f"{stage}/ppl"] > 0 and f"{stage}/lm_eval/arith_mc" in evaluated, stage
    sparsify = read_manifest(run_dir / "sparsify")["metrics"]
    assert sparsify["spike_steps"] == 4 and 0 < sparsify["firing_rate"] < 1
