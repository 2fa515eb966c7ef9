"""The eval stage's measurements, each against a value known by construction or computed by hand:
a model forced to the right answer scores 100% (through greedy decoding on the recurrent path)
and a set with known wrong rows scores exactly their share; the energy figures are
spiking/energy.py's on the same tokens; lm-eval's score on the local multiple-choice task equals
the accuracy computed here from the model's own log-likelihoods, for an HF Mamba teacher and a
spiking student; bad config values fail with the field's name; a stage that is not in the
recipe or not finished is missing, not zero.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import MambaConfig, MambaForCausalLM

import spiking
from pipeline.recipe import RecipeError, load_recipe
from stages import evaluate, tasks
from stages.context import ModelConfig, StageContext
from stages.data import ARITHMETIC_ALPHABET, build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TASKS = ROOT / "recipes" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ARITHMETIC_ALPHABET)


def forced_model(tokenizer, next_char: dict[str, str], neurons: dict | None = None) -> spiking.SpikingMambaForCausalLM:
    """A real SpikingMamba whose next token depends only on the current one, as `next_char` says.

    Embeddings are one-hot, every mixer's out_proj is zero (the blocks add nothing to the
    residual stream), so the LM head sees the current token alone and maps it to its successor
    (a character, or "<eos>"). Through `generate` with the cache this forces the completion.
    """
    vocab = tokenizer.get_vocab()
    config = spiking.SpikingMambaConfig(
        vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=1, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        neurons=neurons or {},
    )
    model = spiking.SpikingMambaForCausalLM(config)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight  # [V, D]
        embedding.zero_()
        embedding[torch.arange(len(tokenizer)), torch.arange(len(tokenizer))] = 1.0
        for block in model.backbone.layers:
            block.mixer.out_proj.weight.zero_()
        head = model.lm_head.weight  # [V, D]
        head.zero_()
        for current, successor in next_char.items():
            head[vocab[successor], vocab[current]] = 10.0
    return model.eval()


FORCE_46 = {"=": "4", "4": "6", "6": "<eos>"}  # every completion is "46"


@pytest.mark.parametrize("neurons", [{}, "spiking"], ids=["dense", "spiking"])
def test_a_model_forced_to_the_answer_scores_100_and_known_misses_count_exactly(tokenizer, neurons):
    model = forced_model(tokenizer, FORCE_46, spiking.default_neurons(D=4) if neurons else None)
    right = Dataset.from_dict({"prompt": ["12+34=", "40+6=", "23+23=", "1+45="], "answer": ["46"] * 4})
    completions = tasks.generate_completions(model, tokenizer, right["prompt"], max_new_tokens=4)
    print("completions:", completions)
    assert completions == ["46"] * 4
    assert evaluate.task_scores(completions, right, ["arith_exact", "math_answer"]) == {"arith_exact": [1.0] * 4, "math_answer": [1.0] * 4}
    assert tasks.exact_match_accuracy(model, tokenizer, right, max_new_tokens=4)["accuracy"] == 1.0

    # two of four reference answers differ from what the model is forced to say: exactly 50%
    mixed = Dataset.from_dict({"prompt": ["12+34=", "20+27=", "30+16=", "1+1="], "answer": ["46", "47", "46", "2"]})
    completions = tasks.generate_completions(model, tokenizer, mixed["prompt"], max_new_tokens=4)
    per_row = evaluate.task_scores(completions, mixed, ["arith_exact"])
    assert per_row == {"arith_exact": [1.0, 0.0, 1.0, 0.0]}
    assert evaluate.mean_and_interval(per_row["arith_exact"], seed=0)[0] == 0.5


def test_a_scorer_that_applies_to_no_row_gives_none_not_zero():
    rows = Dataset.from_dict({"prompt": ["1+1="], "answer": ["no number here"]})
    assert evaluate.task_scores(["2"], rows, ["math_answer"]) == {"math_answer": [None]}
    assert evaluate.mean_and_interval([None], seed=0) == (None, None)


@pytest.fixture(scope="module")
def student(tokenizer):
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    teacher = MambaForCausalLM(config).eval()
    batch = tokenizer(["12+34=46", "7+8=15", "99+1=100"], return_tensors="pt", padding=True)
    student = spiking.from_teacher(teacher, neurons=spiking.default_neurons(D=4), calibration_batches=[batch]).eval()
    return teacher, student


def test_energy_figures_are_spiking_energys_on_the_same_tokens(tokenizer, student):
    teacher, model = student
    torch.manual_seed(1)
    ids = torch.randint(4, len(tokenizer), (3, 10))  # [B, L]
    costs = evaluate.cost_models(eval_batch=3)
    measured, _ = evaluate.measure_energy(model, ids, costs)
    reference = spiking.estimate_energy(model, ids)  # its own forward and spike count
    energy = measured["energy"]
    print("eval:", energy["pj_per_token"], "energy.py:", reference.pj_per_token)
    assert energy["pj_per_token"] == reference.pj_per_token
    assert energy["counts_per_token"] == {"mac": reference.total.mac, "ac": reference.total.ac, "mul": reference.total.mul}
    assert sum(energy["pj_by_kind"].values()) == pytest.approx(reference.pj_per_token, rel=1e-12)
    assert sum(energy["pj_by_group"].values()) == pytest.approx(reference.pj_per_token, rel=1e-12)
    assert energy["spike_driven_ops"] == ["in_proj", "out_proj"]
    assert "x_proj" in energy["dense_ops"] and "lm_head" in energy["dense_ops"]
    assert measured["firing_rate_by_layer"] == [layer.firing_rate for layer in reference.layers if layer.index is not None]
    assert measured["firing_rate"] == reference.firing_rate

    dense, _ = evaluate.measure_energy(teacher, ids, costs)
    assert dense["firing_rate"] is None and dense["energy"]["spike_driven_ops"] == []
    assert dense["energy"]["pj_per_token"] / energy["pj_per_token"] == spiking.energy_ratio(teacher, model, ids)
    # the same spike counts under every cost model, each the figure energy.py gives for that model
    assert list(costs) == ["45nm-horowitz", "45nm-int8", "45nm-memory", "45nm-memory-b3"]
    for name, cost in costs.items():
        assert measured["energy_by_cost_model"]["pj_per_token"][name] == pytest.approx(
            spiking.estimate_energy(model, ids, cost=cost).pj_per_token, rel=1e-12)
    ratios = evaluate.energy_ratios(measured, dense)
    assert ratios["45nm-int8"] == pytest.approx(spiking.energy_ratio(teacher, model, ids, cost=costs["45nm-int8"]))
    assert ratios["int8-teacher"] == pytest.approx(
        dense["energy_by_cost_model"]["pj_per_token"]["45nm-int8"] / energy["pj_per_token"])
    # weights shared by a batch of 3 make every model cheaper per token than at batch 1
    pj = measured["energy_by_cost_model"]["pj_per_token"]
    assert pj["45nm-memory-b3"] < pj["45nm-memory"]


def loglikelihood_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Multiple-choice accuracy from the model's log-likelihood of each choice after the question."""
    correct = 0
    for doc in docs:
        context = tokenizer(doc["question"])["input_ids"]  # with <bos>, as lm-eval encodes it
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + choice)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # [L-1, V]
            scores.append(sum(logprobs[pos - 1, whole[pos]].item() for pos in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_lm_eval_scores_the_local_task_for_teacher_and_student_as_computed_by_hand(tokenizer, student):
    teacher, model = student
    cfg = evaluate.Config(lm_eval=["arith_mc"], lm_eval_include_path=str(LOCAL_TASKS), lm_eval_limit=20)
    manager = evaluate.build_task_manager(cfg)
    docs = [json.loads(line) for line in (LOCAL_TASKS / "arith_mc" / "arith_mc.jsonl").read_text().splitlines()][:20]
    for name, lm in (("teacher (HF MambaForCausalLM)", teacher), ("student (SpikingMamba)", model)):
        scores, per_doc = evaluate.lm_eval_scores(lm, tokenizer, ["arith_mc"], manager, cfg, seed=0)
        by_hand = loglikelihood_accuracy(lm, tokenizer, docs)
        assert len(per_doc["arith_mc"]) == 20 and sum(per_doc["arith_mc"]) / 20 == pytest.approx(scores["arith_mc"]["acc"])
        print(name, "lm-eval acc", scores["arith_mc"]["acc"], "by hand", by_hand)
        assert scores["arith_mc"]["acc"] == pytest.approx(by_hand, abs=1e-12)
    assert evaluate.lm_eval_headline(scores, ["arith_mc"]) == {"arith_mc": scores["arith_mc"]["acc"]}

    with pytest.raises(ValueError, match=r"stages\.eval\.lm_eval: unknown lm-eval task 'no_such_task'"):
        evaluate.build_task_manager(evaluate.Config(lm_eval=["no_such_task"], lm_eval_include_path=str(LOCAL_TASKS)))


def test_config_errors_name_the_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  eval: {tasks: [no_such_scorer]}\n")
    with pytest.raises(RecipeError, match=r"stages\.eval\.tasks: .*unknown task scorer 'no_such_scorer'"):
        load_recipe(recipe)
    recipe.write_text("stages:\n  eval: {models: [teacher, student]}\n")
    with pytest.raises(RecipeError, match=r"stages\.eval\.models\.1"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match=r"stages\.eval\.lm_eval_include_path: .* is not a folder"):
        evaluate.build_task_manager(evaluate.Config(lm_eval=["arith_mc"], lm_eval_include_path=str(tmp_path / "nowhere")))
    assert evaluate.Config().lm_eval == evaluate.PAPER_TASKS  # real recipes: the paper's six by default


def test_unfinished_or_absent_stages_are_missing_with_the_reason(tmp_path):
    for stage in ("teacher", "distill", "rl"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text("{}")
    (tmp_path / "teacher" / "manifest.json").write_text("{}")
    (tmp_path / "distill" / "manifest.json").write_text("{}")
    (tmp_path / "rl" / "manifest.json").write_text("{}")
    (tmp_path / "rl" / "config.json").unlink()  # an RL LoRA adapter saved alone
    (tmp_path / "distill" / "manifest.json").unlink()  # interrupted
    ctx = StageContext(
        stage="eval", run_dir=tmp_path, out_dir=tmp_path / "eval", model=ModelConfig(),
        upstream={s: tmp_path / s for s in ("data", "teacher", "distill", "rl")},
    )
    found, missing = evaluate.find_models(evaluate.Config(), ctx)
    assert list(found) == ["teacher"]
    assert missing == {
        "distill": "not finished (no manifest)",
        "sparsify": "not in this run's recipe",
        "rl": "no full model in its folder (e.g. an RL LoRA adapter saved with merge: false)",
    }
