"""The data stage: arithmetic generator, splits without overlap, tokenizer, packing, local sources."""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path

import pytest
from datasets import load_from_disk
from pydantic import ValidationError
from transformers import AutoTokenizer

from stages import data
from stages.context import ModelConfig, StageContext, TeacherSource

SMALL = {"source": {"synthetic": "arithmetic", "digits": [2], "num_problems": 800}, "test_size": 100, "rl_prompts": 100, "seq_len": 16}


def make_ctx(tmp_path: Path, seed: int = 0, model: ModelConfig | None = None, name: str = "data") -> StageContext:
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage="data", run_dir=tmp_path, out_dir=out, upstream={}, model=model or ModelConfig(), seed=seed)


def run_data(tmp_path: Path, seed: int = 0, model: ModelConfig | None = None, name: str = "data", **overrides):
    ctx = make_ctx(tmp_path, seed, model, name)
    metrics = data.run(data.Config(**{**SMALL, **overrides}), ctx)
    return ctx.out_dir, metrics


def corpus_examples(out: Path, split: str) -> list[str]:
    """The whole examples (<bos>…<eos>) recoverable from the packed blocks of one split."""
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    blocks = load_from_disk(str(out / "corpus"))[split]["input_ids"]
    stream = tokenizer.decode([t for block in blocks for t in block])
    return re.findall(r"<bos>([^<]*)<eos>", stream)


def test_arithmetic_splits_do_not_overlap(tmp_path):
    out, metrics = run_data(tmp_path)
    prompts = load_from_disk(str(out / "prompts"))
    test = [p + a for p, a in zip(prompts["test"]["prompt"], prompts["test"]["answer"])]
    rl = [p + a for p, a in zip(prompts["train"]["prompt"], prompts["train"]["answer"])]
    corpus = corpus_examples(out, "train")
    assert len(test) == 100 and len(rl) == 100
    assert len(set(test)) == len(test) and len(set(rl)) == len(rl)
    assert len(corpus) > 500  # nearly all 600 corpus problems survive packing (tails cut)
    assert not set(test) & set(rl)
    assert not set(test) & set(corpus)
    assert not set(rl) & set(corpus)  # RL prompts are held out of the teacher's corpus
    # the test split's corpus is the test problems, for perplexity
    assert set(corpus_examples(out, "test")) <= set(test)
    assert metrics["rl_prompts"] == 100 and metrics["test_prompts"] == 100


def test_arithmetic_answers_are_right_and_digits_respected(tmp_path):
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    source = {"synthetic": "arithmetic", "digits": [1, 3], "digit_weights": [1, 3], "operators": ["+", "-", "*"], "num_problems": 400}
    problems = data.arithmetic_problems(data.SyntheticSource(**source), seed=3)
    assert len(problems) == 400 and len(set(problems["prompt"])) == 400
    digit_counts = {1: 0, 3: 0}
    for prompt, answer, text in zip(problems["prompt"], problems["answer"], problems["text"]):
        a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt).groups()
        assert len(a) == len(b)
        digit_counts[len(a)] += 1
        assert answer == str(ops[op](int(a), int(b)))
        assert text == prompt + answer
    assert digit_counts == {1: 100, 3: 300}  # shares 1:3, exactly apportioned


def test_generator_is_deterministic_per_seed(tmp_path):
    out_a, _ = run_data(tmp_path, seed=5, name="a")
    out_b, _ = run_data(tmp_path, seed=5, name="b")
    out_c, _ = run_data(tmp_path, seed=6, name="c")
    load = lambda out, what: load_from_disk(str(out / what))  # noqa: E731
    assert load(out_a, "corpus")["train"]["input_ids"] == load(out_b, "corpus")["train"]["input_ids"]
    assert load(out_a, "prompts")["test"]["prompt"] == load(out_b, "prompts")["test"]["prompt"]
    assert load(out_a, "prompts")["test"]["prompt"] != load(out_c, "prompts")["test"]["prompt"]


def test_char_tokenizer_round_trips_and_pads_left(tmp_path):
    out, _ = run_data(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = tokenizer("37+48=85")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 9  # <bos> + one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == "37+48=85"
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["1+1=", "12+30="], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
    blocks = load_from_disk(str(out / "corpus"))["train"]["input_ids"]
    assert all(len(block) == 16 for block in blocks)


def test_padding_side_is_configurable(tmp_path):
    out, _ = run_data(tmp_path, padding_side="right")
    assert AutoTokenizer.from_pretrained(out / "tokenizer").padding_side == "right"


def test_preference_pairs(tmp_path):
    out, metrics = run_data(tmp_path, preference_pairs=40)
    pairs = load_from_disk(str(out / "preferences"))
    rl = load_from_disk(str(out / "prompts"))["train"]
    assert metrics["preference_pairs"] == 40 and pairs.column_names == ["prompt", "chosen", "rejected"]
    assert pairs["prompt"] == rl["prompt"][:40] and pairs["chosen"] == rl["answer"][:40]
    assert all(c != r and r.lstrip("-").isdigit() for c, r in zip(pairs["chosen"], pairs["rejected"]))
    out_all, _ = run_data(tmp_path, name="all", preference_pairs=True)
    assert len(load_from_disk(str(out_all / "preferences"))) == 100
    with pytest.raises(ValueError, match="preference_pairs=101"):
        run_data(tmp_path, name="toomany", preference_pairs=101)


def test_bad_synthetic_sources():
    with pytest.raises(ValidationError, match="unknown generator 'calculus'"):
        data.Config(source={"synthetic": "calculus"})
    with pytest.raises(ValidationError, match=r"num_problems: 150 problems asked of 1-digit '\+', which has only 100 distinct problems"):
        data.Config(source={"synthetic": "arithmetic", "digits": [1], "num_problems": 150})  # with the recipe, not at run time
    with pytest.raises(ValidationError, match="digit_weights"):
        data.Config(source={"synthetic": "arithmetic", "digits": [1, 2], "digit_weights": [1.0]})
    with pytest.raises(ValidationError, match="exactly one of the keys synthetic, hub, files, text_folder or reasoning_gym"):
        data.Config(source={"synthetic": "arithmetic", "files": ["a.jsonl"]})
    with pytest.raises(ValidationError, match="seq_len"):
        data.Config(seq_len=1)
    with pytest.raises(ValidationError, match="extra"):
        data.Config(sequence_length=64)


def test_too_many_held_out_examples_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="rl_prompts=800 leaves no corpus"):
        run_data(tmp_path, rl_prompts=800)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_with_a_given_tokenizer(tmp_path):
    # the arithmetic tokenizer saved to a folder stands in for a pretrained model's tokenizer
    tok_dir = tmp_path / "tok"
    data.build_char_tokenizer(data.ARITHMETIC_ALPHABET).save_pretrained(tok_dir)
    rows = [{"q": f"{a}+{a + 1}=", "a": str(2 * a + 1), "id": a} for a in range(10, 90)]
    rows += rows[:5]  # duplicates must not end up in two splits
    files = [str(write_jsonl(tmp_path / "part1.jsonl", rows[:40])), str(write_jsonl(tmp_path / "part2.jsonl", rows[40:]))]
    model = ModelConfig(tokenizer=str(tok_dir))
    source = {"files": files, "prompt_column": "q", "answer_column": "a"}
    out, metrics = run_data(tmp_path, model=model, source=source, test_size=10, rl_prompts=10, seq_len=8)
    prompts = load_from_disk(str(out / "prompts"))
    assert metrics["vocab_size"] == 18 and metrics["corpus_examples"] == 80 - 20
    assert set(prompts["test"]["prompt"]).isdisjoint(prompts["train"]["prompt"])
    assert not set(prompts["test"]["prompt"]) & {e.split("=")[0] + "=" for e in corpus_examples(out, "train")}
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.decode(tokenizer("11+12=23")["input_ids"], skip_special_tokens=True) == "11+12=23"


def test_local_text_files_build_a_char_tokenizer(tmp_path):
    lines = [f"the cat sat on mat number {i}" for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    out, metrics = run_data(tmp_path, source={"files": [str(path)]}, test_size=0.1, seq_len=32)
    assert not (out / "prompts").exists()  # text only: nothing to prompt with
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert set(tokenizer.get_vocab()) >= set("the cat sat on mat number 0123456789")
    assert tokenizer.decode(tokenizer(lines[3])["input_ids"], skip_special_tokens=True) == lines[3]
    assert metrics["corpus_examples"] == 54 and metrics["corpus_test_blocks"] >= 1


def test_hub_code_path_on_a_local_dataset_folder(tmp_path):
    # load_dataset(<folder>) is the same call a hub id takes; the folder has its own test split
    folder = tmp_path / "hubds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"{i}+{i}={2 * i}"} for i in range(200)])
    write_jsonl(folder / "test.jsonl", [{"text": f"{i}+{i}={2 * i}"} for i in range(190, 230)])
    source = {"hub": str(folder), "split": "train", "test_split": "test", "text_column": "text", "max_examples": 150}
    out, metrics = run_data(tmp_path, source=source, seq_len=8)
    assert metrics["corpus_examples"] == 150  # max_examples caps the train split
    test_texts = {f"{i}+{i}={2 * i}" for i in range(190, 230)}
    assert not test_texts & set(corpus_examples(out, "train"))
    assert set(corpus_examples(out, "test")) <= test_texts


def test_bad_local_sources(tmp_path):
    with pytest.raises(ValueError, match="file not found: .*missing.jsonl"):
        run_data(tmp_path, source={"files": [str(tmp_path / "missing.jsonl")], "text_column": "text"})
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "1+1=", "answer": "2"}] * 3)
    with pytest.raises(ValueError, match="no column 'prompt'.*columns: \\['question', 'answer'\\]"):
        run_data(tmp_path, source={"files": [str(good)], "prompt_column": "prompt", "answer_column": "answer"})
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_data(tmp_path, source={"files": [str(empty)]})
    with pytest.raises(ValidationError, match="text_column, or prompt_column and answer_column"):
        data.Config(source={"files": [str(good)]})
    with pytest.raises(ValidationError, match="streaming needs max_examples"):
        data.Config(source={"hub": "HuggingFaceFW/fineweb-edu", "text_column": "text", "streaming": True})


def test_pretrained_teacher_tokenizer_is_used(tmp_path):
    # model.teacher.pretrained names a folder holding a tokenizer: the data stage takes it from there
    teacher_dir = tmp_path / "teacher_folder"
    data.build_char_tokenizer(data.ARITHMETIC_ALPHABET + "xyz").save_pretrained(teacher_dir)
    model = ModelConfig(teacher=TeacherSource(pretrained=str(teacher_dir)))
    out, metrics = run_data(tmp_path, model=model)
    assert metrics["vocab_size"] == 21
