"""Real language: reasoning-gym problems and reward, the BPE tokenizer, held-out last-word tasks,
bootstrap intervals, the unigram baseline, and recipes/small.yaml's code path on a slice of real
text that every machine has (Python's standard library sources)."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

import rewards
from stages import data, evaluate, tasks
from stages.context import ModelConfig, StageContext

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]
GYM = {"reasoning_gym": ["chain_sum"], "config": {"min_terms": 2, "max_terms": 2, "max_digits": 2}, "size": 600}
TEXT = {"text_folder": STDLIB, "glob": ["json/*.py", "email/*.py", "logging/*.py"], "max_documents": 30}


def run_data(tmp_path: Path, **overrides) -> tuple[Path, dict]:
    out = tmp_path / "data"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage="data", run_dir=tmp_path, out_dir=out, upstream={}, model=ModelConfig(), seed=0)
    cfg = data.Config(**{"source": TEXT, "prompt_source": GYM, "test_size": 100, "rl_prompts": 100, "seq_len": 64,
                         "corpus_test_size": 5, "task_in_corpus": 200, "bpe_vocab_size": 600, "lastword_passages": 20,
                         **overrides})
    return out, data.run(cfg, ctx)


# ------------------------------------------------------------------------------ intervals, baselines


def test_bootstrap_interval_by_hand():
    assert tasks.bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert tasks.bootstrap_ci([0.0, 1.0], [0.0, 1.0]) == (0.0, 0.0)  # paired: identical outcomes, no difference
    # 100 outcomes at p = 0.5: the normal interval is 0.5 ± 1.96·0.05 = [0.402, 0.598]
    lo, hi = tasks.bootstrap_ci([1, 0] * 50)
    assert 0.39 < lo < 0.42 and 0.58 < hi < 0.61
    assert tasks.bootstrap_ci([1, 0] * 50, seed=3) == tasks.bootstrap_ci([1, 0] * 50, seed=3)
    # paired beats unpaired when both models share the hard problems: a +10-point gain on 100 problems
    base = [1.0] * 50 + [0.0] * 50
    better = [1.0] * 60 + [0.0] * 40
    paired_lo, _ = tasks.bootstrap_ci(better, base)
    assert paired_lo > 0  # only 10 problems differ, all in the student's favour
    with pytest.raises(ValueError, match="2 paired baseline scores for 3 scores"):
        tasks.bootstrap_ci([1, 0, 1], [1, 0])


def test_paired_difference_uses_only_rows_both_scored():
    result = evaluate.paired([1.0, 0.0, None, 1.0], [0.0, 0.0, 1.0, None], seed=0)
    assert result["n"] == 2 and result["difference"] == 0.5
    assert evaluate.paired([None], [1.0], seed=0) is None
    mean, interval = evaluate.mean_and_interval([1.0, None, 0.0, 1.0, 1.0], seed=0)
    assert mean == 0.75 and 0.0 <= interval[0] <= mean <= interval[1] <= 1.0


def test_headline_metric_of_a_generate_until_task():
    assert evaluate.headline_metric("heldout_lastword_gen", {"exact_match": 0.1}) == "exact_match"
    assert evaluate.headline_metric("hellaswag", {"acc": 0.3, "acc_norm": 0.4}) == "acc_norm"
    assert evaluate.headline_metric("piqa", {"acc_norm": 0.4, "acc": 0.3}) == "acc"
    assert evaluate.lm_eval_headline({"g": {"exact_match": 0.25}}, ["g", "missing"]) == {"g": 0.25, "missing": None}


def test_unigram_perplexity_by_hand():
    # vocabulary 4; training counts of ids 0..3 = 3, 1, 0, 0 (+1 smoothing: 4, 2, 1, 1 of 8)
    train = Dataset.from_dict({"input_ids": [[0, 0, 1, 0]]})
    test = Dataset.from_dict({"input_ids": [[3, 0, 1]]})  # predicted positions: ids 0 and 1
    expected = float(torch.exp(-(torch.log(torch.tensor(4 / 8)) + torch.log(torch.tensor(2 / 8))) / 2))
    assert evaluate.unigram_perplexity(train, test, vocab_size=4) == pytest.approx(expected)


# ------------------------------------------------------------------------------ reasoning-gym


def test_reasoning_gym_reward_calls_the_tasks_own_scorer():
    import reasoning_gym as rg

    problems = rg.create_dataset("chain_sum", size=3, seed=5, min_terms=2, max_terms=2, max_digits=2)
    entries = [json.dumps(problems[i], default=str) for i in range(3)]
    answers = [str(problems[i]["answer"]) for i in range(3)]
    completions = [answers[0], f" {answers[1]}\nand more", str(int(answers[2]) + 1)]
    assert rewards.REWARDS["reasoning_gym"](completions, rg_entry=entries) == [1.0, 1.0, 0.0]
    assert rewards.reasoning_gym(["1"], rg_entry=[None]) == [None]
    assert rewards.reasoning_gym(["1", "2"], answer=["1", "2"]) == [None, None]  # no rg_entry column: does not apply


def test_data_stage_with_real_text_and_reasoning_gym_problems(tmp_path):
    out, metrics = run_data(tmp_path)
    prompts = load_from_disk(str(out / "prompts"))
    test, rl = prompts["test"], prompts["train"]
    assert len(test) == 100 and len(rl) == 100 and "rg_entry" in test.column_names
    assert not set(test["prompt"]) & set(rl["prompt"])
    entry = json.loads(test[0]["rg_entry"])
    assert entry["metadata"]["source_dataset"] == "chain_sum" and test[0]["prompt"] == entry["question"] + "\nAnswer: "
    # worked examples in the corpus: counted, and never a test or RL problem
    assert metrics["task_examples_in_corpus"] == 200 and 0 < metrics["task_token_share"] < 1
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    stream = tokenizer.decode([t for block in load_from_disk(str(out / "corpus"))["train"]["input_ids"] for t in block])
    assert not any(p in stream for p in test["prompt"])
    assert not any(p + a in stream for p, a in zip(rl["prompt"], rl["answer"]))
    assert "Answer: " in stream  # ... but worked problems are there
    # ... and alone in corpus/task, once each: every problem there is one of the corpus's, none held out
    task_stream = tokenizer.decode([t for block in load_from_disk(str(out / "corpus"))["task"]["input_ids"] for t in block])
    assert len(load_from_disk(str(out / "corpus"))["task"]) == metrics["task_blocks"] > 0
    worked = [w for w in task_stream.split(tokenizer.eos_token)[1:-1]]  # the first and last may be cut by packing
    assert len(worked) > 100 and all(w.startswith(tokenizer.bos_token + "State the final answer") for w in worked)
    for w in worked:  # each a worked problem with its right answer: "... a ± b =\nAnswer: c"
        question, answer = w.rsplit(" =\nAnswer: ", 1)
        a, sign, b = question.split()[-3:]
        assert int(answer) == (int(a) + int(b) if sign == "+" else int(a) - int(b))
    assert sum(w in stream for w in worked) > 0.9 * len(worked)  # the same problems (packing cuts a few in train)
    assert not any(p in task_stream for p in test["prompt"]) and not any(p in task_stream for p in rl["prompt"])
    # the BPE tokenizer trained here: its size, byte-level round trip of any string, <bos> first
    assert len(tokenizer) == metrics["vocab_size"] == 600
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == text
    # held-out documents and the two lm-eval tasks written from them
    heldout = load_from_disk(str(out / "heldout"))["text"]
    assert len(heldout) == 5
    for name in tasks.LASTWORD_TASKS:
        rows = [json.loads(line) for line in (out / "lm_eval_tasks" / name / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == metrics["lastword_passages"] > 0
        for row in rows:
            assert any(row["context"] in " ".join(d.split()) for d in heldout)
            if name.endswith("_mc"):
                assert row["choices"][row["label"]] == row["target"] and len(set(row["choices"])) == len(row["choices"])


def test_task_repeats_multiply_the_worked_examples(tmp_path):
    _, once = run_data(tmp_path / "once", lastword_passages=0)
    _, twice = run_data(tmp_path / "twice", lastword_passages=0, task_repeats=2)
    assert twice["task_examples_in_corpus"] == once["task_examples_in_corpus"] == 200
    assert twice["corpus_examples"] == once["corpus_examples"] + 200
    task_tokens = once["task_token_share"] * once["corpus_train_tokens"]
    assert twice["task_token_share"] * twice["corpus_train_tokens"] == pytest.approx(2 * task_tokens, rel=1e-9)


def test_task_share_mixes_the_worked_examples_into_kd_training(tmp_path):
    from datasets import DatasetDict

    from stages.training import kd_training_blocks

    corpus = DatasetDict(train=Dataset.from_dict({"input_ids": [[i] for i in range(900)]}),
                         task=Dataset.from_dict({"input_ids": [[-i - 1] for i in range(30)]}))
    assert kd_training_blocks(corpus, 0.0, seed=0, stage="distill") is corpus["train"]
    mixed = kd_training_blocks(corpus, 0.25, seed=0, stage="distill")
    ids = [block[0] for block in mixed["input_ids"]]
    assert set(ids) == set(range(900)) | {-i - 1 for i in range(30)}  # every block of both at least once
    share = sum(i < 0 for i in ids) / len(ids)
    assert 0.22 < share < 0.28  # a quarter of the draws: each worked block about 10 times
    assert [b[0] for b in kd_training_blocks(corpus, 0.25, seed=0, stage="distill")["input_ids"]] == ids  # seeded
    # a corpus without worked examples: the recipe field named, before any training
    for bad in (DatasetDict(train=corpus["train"]), DatasetDict(train=corpus["train"], task=corpus["task"].select([]))):
        with pytest.raises(ValueError, match=r"stages.sparsify.task_share=0.3 needs .*stages.data.task_in_corpus"):
            kd_training_blocks(bad, 0.3, seed=0, stage="sparsify")


def test_lastword_passages_by_hand():
    words = " ".join(f"word{i}" for i in range(40))
    document = f"{words} final.\n\nshort paragraph ending here.\n\n{words} 123"
    passages = data.lastword_passages([document], n=10, seed=0)
    # only the first paragraph qualifies: 30+ words and a last word of letters
    assert passages == [{"context": words, "target": "final"}]
    cut = data.lastword_passages([document], n=10, seed=0, context_chars=20)[0]["context"]
    assert len(cut) <= 20 and words.endswith(cut)


def test_lm_eval_loads_the_written_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    passages = [{"context": f"the context number {i} ends with", "target": t} for i, t in enumerate(["alpha", "beta", "gamma", "delta"])]
    data.write_lastword_tasks(passages, tmp_path / "lm_eval_tasks", random.Random(0))
    manager = TaskManager(include_path=str(tmp_path / "lm_eval_tasks"))
    assert set(tasks.LASTWORD_TASKS) <= set(manager.all_tasks)
    loaded = manager.load_task_or_group(list(tasks.LASTWORD_TASKS))
    docs = list(loaded["heldout_lastword_mc"].test_docs())
    assert len(docs) == 4 and docs[0]["choices"][docs[0]["label"]] == "alpha"


# ------------------------------------------------------------------------------ the recipe


@pytest.mark.slow
def test_small_recipe_code_path_on_a_slice_of_real_text(tmp_path):
    """Every stage of recipes/small.yaml through the CLI, on 30 standard-library files, tiny budgets."""
    from pipeline.__main__ import main
    from pipeline.manifest import read_manifest

    run = tmp_path / "run"
    overrides = [
        f"run.output_dir={run}",
        f"stages.data.source.text_folder={STDLIB}",
        "stages.data.source.glob=[json/*.py, email/*.py, logging/*.py]",
        "stages.data.source.max_documents=30",
        "stages.data.prompt_source.size=500", "stages.data.test_size=40", "stages.data.rl_prompts=40",
        "stages.data.corpus_test_size=4", "stages.data.task_in_corpus=200", "stages.data.bpe_vocab_size=512",
        "stages.data.lastword_passages=16", "stages.data.seq_len=48",
        "model.teacher.train_from_scratch.hidden_size=32", "model.teacher.train_from_scratch.num_hidden_layers=2",
        "stages.teacher.max_steps=4", "stages.teacher.eval_samples=16", "stages.teacher.eval_blocks=4",
        "stages.distill.max_steps=2", "stages.distill.eval_samples=16", "stages.distill.eval_blocks=4",
        "stages.sparsify.max_steps=2", "stages.sparsify.eval_samples=16", "stages.sparsify.eval_blocks=4",
        "stages.rl.trl.max_steps=1", "stages.rl.trl.per_device_train_batch_size=8", "stages.rl.eval_samples=16",
        "stages.eval.eval_samples=16", "stages.eval.eval_blocks=4",
    ]
    assert main(["run", str(ROOT / "recipes" / "small.yaml"), *overrides]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["baselines"]["unigram_ppl"] > 1
    for stage in ("teacher", "distill", "sparsify", "rl"):
        entry = metrics["stages"][stage]
        assert entry["status"] == "evaluated", stage
        lo, hi = entry["accuracy_ci95"]["reasoning_gym"]
        assert 0 <= lo <= entry["accuracy"]["reasoning_gym"] <= hi <= 1
        assert set(entry["lm_eval_ci95"]) == set(tasks.LASTWORD_TASKS)
        assert all(entry["lm_eval_headline"][task] is not None for task in tasks.LASTWORD_TASKS)  # exact_match too
    assert set(metrics["paired"]) >= {"distill_vs_teacher", "sparsify_vs_teacher", "rl_vs_teacher", "rl_vs_sparsify"}
    report = (run / "eval" / "report" / "report.md").read_text()
    assert "## Paired differences" in report and "95% CI (reasoning_gym)" in report and "unigram" in report
    assert read_manifest(run / "data")["metrics"]["vocab_size"] == 512
