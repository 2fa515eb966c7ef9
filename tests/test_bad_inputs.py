"""Bad recipes and bad inputs, table-driven, through the real CLI (`pipeline.__main__.main`, in process).

Each case gives exit status 2, one message (no traceback) that names the field or the file, and
leaves the run folder untouched: for a brand-new run, no folder at all. Recipe mistakes are caught
by `load_recipe`; mistakes in the inputs (files, columns, tokenizer, teacher) by the runner's
preflight, before the run folder is created. A reward that raises can only show itself while the
rl stage runs: that case fails the stage with the reward's name and leaves the finished stages as
they were (last test).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from transformers import MambaConfig, MambaForCausalLM

from pipeline.__main__ import main
from tests.faults.helpers import TINY_MODEL, TINY_STAGES, copy_run, finished_run, snapshot

BASE_STAGES = ("data", "teacher")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Input files the cases point at (outside any run folder)."""
    from stages.data import build_char_tokenizer

    folder = tmp_path_factory.mktemp("inputs")
    rows = [{"question": f"{a}+{a}=", "answer": str(2 * a)} for a in range(50)]
    files = {
        "good": folder / "good.jsonl",
        "empty": folder / "empty.jsonl",
        "blank": folder / "blank.jsonl",
        "garbled": folder / "garbled.jsonl",
        "odd_extension": folder / "data.xyz",
        "tokenizer": folder / "tokenizer",
        "small_vocab_teacher": folder / "small_vocab_teacher",
    }
    files["good"].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    files["empty"].write_text("")
    files["blank"].write_text("\n\n")
    files["garbled"].write_text('{"question": "1+1=", "answer": \n')
    files["odd_extension"].write_text("1+1=2\n")
    build_char_tokenizer("0123456789+-*=").save_pretrained(files["tokenizer"])  # 18 tokens
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, state_size=4)).save_pretrained(
        files["small_vocab_teacher"]
    )
    return files


def base_recipe(run_dir: Path) -> dict[str, Any]:
    return {
        "run": {"name": "bad", "output_dir": str(run_dir), "seed": 0},
        "model": copy.deepcopy(TINY_MODEL),
        "stages": {name: copy.deepcopy(TINY_STAGES[name]) for name in BASE_STAGES},
    }


def files_source(path: Path, **columns) -> dict[str, Any]:
    return {"files": [str(path)], **(columns or {"prompt_column": "question", "answer_column": "answer"})}


def set_path(recipe: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = recipe
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def with_rl(recipe: dict, **rl) -> None:
    recipe["stages"]["rl"] = {"algo": "grpo", "rewards": ["arith_exact"], **rl}


# (id, change to the recipe dict or raw file text (bytes: not UTF-8), extra CLI arguments, what the message must say)
Change = Callable[[dict, dict], Any] | str | bytes | None
CASES: list[tuple[str, Change, list[str], str]] = [
    # --- unknown keys
    ("unknown top-level key", lambda r, f: r.update(runn={}), [], r"runn: unknown key"),
    ("unknown stage", lambda r, f: r["stages"].update(distil={}), [], r"stages\.distil: unknown stage"),
    ("unknown stage key", lambda r, f: set_path(r, "stages.teacher.max_step", 5), [],
     r"stages\.teacher\.max_step: unknown key \(allowed: .*max_steps"),
    ("unknown nested key", lambda r, f: r["stages"].update(distill={"neuron": {"DD": 4}}), [],
     r"stages\.distill\.neuron\.DD: unknown key"),
    ("unknown trainer field", lambda r, f: set_path(r, "stages.teacher.trainer", {"max_grad_nrom": 1}), [],
     r"stages\.teacher\.trainer.*trainer\.max_grad_nrom: not a transformers TrainingArguments field"),
    ("owned trainer field", lambda r, f: set_path(r, "stages.teacher.trainer", {"learning_rate": 1}), [],
     r"trainer\.learning_rate: set it with the stage's `lr` field"),
    ("owned trl field", lambda r, f: with_rl(r, trl={"seed": 3}), [], r"stages\.rl.*trl\.seed: the run sets it"),
    ("unknown trl field", lambda r, f: with_rl(r, trl={"num_generatons": 4}), [],
     r"trl\.num_generatons: not a field of trl\.GRPOConfig"),
    # --- wrong types
    ("max_steps not a number", lambda r, f: set_path(r, "stages.teacher.max_steps", "many"), [],
     r"stages\.teacher\.max_steps: Input should be a valid integer"),
    ("lr a list", lambda r, f: set_path(r, "stages.teacher.lr", [1]), [], r"stages\.teacher\.lr: Input should be a valid number"),
    ("stages not a mapping", lambda r, f: r.update(stages=["data"]), [], r"stages: should be a mapping"),
    ("override of the wrong type", None, ["stages.teacher.batch_size=abc"],
     r"stages\.teacher\.batch_size: .*set on the command line: stages\.teacher\.batch_size='abc'"),
    ("reward weight not a number", lambda r, f: with_rl(r, rewards=[{"arith_exact": "heavy"}]), [],
     r"rewards\.arith_exact: weight must be a number"),
    # --- out-of-range values
    ("zero max_steps", lambda r, f: set_path(r, "stages.teacher.max_steps", 0), [],
     r"stages\.teacher\.max_steps: Input should be greater than or equal to 1"),
    ("warmup ratio above 1", lambda r, f: set_path(r, "stages.teacher.warmup_ratio", 1.5), [], r"stages\.teacher\.warmup_ratio"),
    ("negative seed", lambda r, f: set_path(r, "run.seed", -1), [], r"run\.seed: Input should be greater than or equal to 0"),
    ("unknown log level", lambda r, f: set_path(r, "run.log_level", "loud"), [], r"run\.log_level"),
    ("sgc lambda above 1", lambda r, f: r["stages"].update(distill={"sgc": {"lambda0": 2}}), [], r"stages\.distill\.sgc.*lambda0"),
    ("digit count 0", lambda r, f: set_path(r, "stages.data.source.digits", [0]), [],
     r"stages\.data\.source.*digits must be distinct digit counts in 1\.\.9"),
    ("fractional test size above 1", lambda r, f: set_path(r, "stages.data.test_size", 2.5), [], r"stages\.data\.test_size"),
    ("unknown scan backend", lambda r, f: set_path(r, "model.scan_backend", "cuda"), [], r"model\.scan_backend"),
    ("unknown rl algorithm", lambda r, f: with_rl(r, algo="a2c"), [], r"stages\.rl\.algo"),
    ("unknown generator", lambda r, f: set_path(r, "stages.data.source.synthetic", "poetry"), [],
     r"unknown generator 'poetry' for source\.synthetic"),
    ("two source kinds", lambda r, f: set_path(r, "stages.data.source", {"synthetic": "arithmetic", "files": ["a"]}), [],
     r"stages\.data\.source: a source needs exactly one of the keys synthetic, hub, files, text_folder or reasoning_gym"),
    ("both teacher sources", lambda r, f: set_path(r, "model.teacher.pretrained", str(f["small_vocab_teacher"])), [],
     r"model\.teacher: set exactly one of `pretrained`.*got both"),
    # --- unknown reward names, bad reward arguments
    ("unknown reward", lambda r, f: with_rl(r, rewards=["arith_exakt"]), [], r"rewards\.arith_exakt: unknown reward"),
    ("reward module missing", lambda r, f: with_rl(r, rewards=["no_such_package.rewards.brevity"]), [],
     r"reward 'no_such_package\.rewards\.brevity': cannot import module 'no_such_package\.rewards'"),
    ("reward function missing", lambda r, f: with_rl(r, rewards=["tests.faults.helpers.no_such_reward"]), [],
     r"module 'tests\.faults\.helpers' has no callable 'no_such_reward'"),
    ("reward bad arguments", lambda r, f: with_rl(r, rewards=[{"format": {"colour": "red"}}]), [],
     r"rewards\.format: bad arguments \['colour'\]"),
    ("reward listed twice", lambda r, f: with_rl(r, rewards=["arith_exact", {"arith_exact": 2}]), [],
     r"rewards: arith_exact listed twice"),
    # --- the recipe file and the command line
    ("recipe is not YAML", "stages: {data: [\n", [], r"not valid YAML at line 2, column 1: expected the node content"),
    ("recipe is not UTF-8", b"run: {name: caf\xe9}\nstages: {data: {}}\n", [],
     r"not UTF-8 text \(byte 0xe9 at line 1, offset 15\); save the recipe as UTF-8"),
    ("recipe has a key twice", "stages:\n  data: {}\n  data: {seq_len: 8}\n", [],
     r"not valid YAML at line 3, column 3: found the key 'data' twice"),
    ("recipe has a non-name top-level key", "1: {}\nstages: {data: {}}\n", [], r"top-level key 1 is not a name"),
    ("recipe is empty", "", [], r"the recipe is empty"),
    ("recipe is a list", "- data\n- teacher\n", [], r"a recipe is a mapping with run / model / stages sections, got list"),
    ("recipe runs no stage", "stages: {}\n", [], r"stages: the recipe runs no stage"),
    ("override of a stage not in the recipe", None, ["stages.rl.algo=dpo"], r"override 'stages\.rl\.algo=dpo': stage 'rl' is not in"),
    ("--from a stage not in the recipe", None, ["--from", "distill"], r"--from distill: not a stage of"),
    ("--only with unfinished upstream", None, ["--only", "teacher"], r"--only teacher: .*data \(pending\)"),
    # --- missing files, empty datasets, wrong columns (preflight, before the run folder exists)
    ("data file missing", lambda r, f: set_path(r, "stages.data.source", files_source(f["good"].with_name("missing.jsonl"))),
     [], r"stages\.data\.source\.files: file not found: .*missing\.jsonl"),
    ("data file empty", lambda r, f: set_path(r, "stages.data.source", files_source(f["empty"])), [],
     r"stages\.data\.source\.files: the dataset is empty \(.*empty\.jsonl hold no bytes\)"),
    ("data file without records", lambda r, f: set_path(r, "stages.data.source", files_source(f["blank"])), [],
     r"stages\.data\.source\.files: the dataset is empty \(.*blank\.jsonl hold no examples\)"),
    ("data file garbled", lambda r, f: set_path(r, "stages.data.source", files_source(f["garbled"])), [],
     r"stages\.data\.source\.files: cannot read .*garbled\.jsonl"),
    ("data file format unknown", lambda r, f: set_path(r, "stages.data.source", files_source(f["odd_extension"])), [],
     r"stages\.data\.source\.files: cannot tell the format of .*data\.xyz"),
    ("wrong prompt column", lambda r, f: set_path(r, "stages.data.source",
                                                   files_source(f["good"], prompt_column="q", answer_column="answer")), [],
     r"stages\.data\.source\.prompt_column: no column 'q' in .*good\.jsonl; columns: \['answer', 'question'\]"),
    ("wrong text column in the prompt source", lambda r, f: set_path(r, "stages.data.prompt_source",
                                                                      files_source(f["good"], text_column="body")), [],
     r"stages\.data\.prompt_source\.text_column: no column 'body'"),
    ("unknown reasoning-gym task", lambda r, f: set_path(r, "stages.data.prompt_source", {"reasoning_gym": ["no_such_gym_task"]}),
     [], r"stages\.data\.prompt_source\.reasoning_gym: 'no_such_gym_task'"),
    ("reasoning-gym template without the question", lambda r, f: set_path(
        r, "stages.data.prompt_source", {"reasoning_gym": ["chain_sum"], "template": "Answer: "}), [],
     r"stages\.data\.prompt_source.*template must contain \{question\}"),
    # --- every path-valued field, checked before the run folder exists
    ("lm-eval include path missing", lambda r, f: r["stages"].update(
        eval={"lm_eval": [], "lm_eval_include_path": str(f["tokenizer"].with_name("no_tasks"))}), [],
     r"stages\.eval\.lm_eval_include_path: .*no_tasks is not a folder"),
    ("unknown lm-eval task", lambda r, f: r["stages"].update(eval={"lm_eval": ["no_such_task"]}), [],
     r"stages\.eval\.lm_eval: unknown lm-eval task 'no_such_task'"),
    ("sparsify teacher folder missing", lambda r, f: r["stages"].update(
        sparsify={"teacher": str(f["tokenizer"].with_name("no_teacher"))}), [],
     r"stages\.sparsify\.teacher: .*no_teacher is not a folder"),
    ("deepspeed config missing", lambda r, f: set_path(r, "stages.teacher.trainer", {"deepspeed": "no_such_ds.json"}), [],
     r"stages\.teacher\.trainer\.deepspeed: no_such_ds\.json is not a file"),
    ("trl deepspeed config missing", lambda r, f: with_rl(r, trl={"deepspeed": "no_such_ds.json"}), [],
     r"stages\.rl\.trl\.deepspeed: no_such_ds\.json is not a file"),
    # --- tokenizer / teacher
    ("tokenizer folder missing", lambda r, f: set_path(r, "model.tokenizer", str(f["tokenizer"].with_name("nowhere"))), [],
     r"model\.tokenizer: cannot load '.*nowhere'"),
    ("pretrained teacher missing", lambda r, f: set_path(r, "model.teacher", {"pretrained": str(f["tokenizer"].with_name("gone"))}),
     [], r"model\.teacher\.pretrained: cannot load '.*gone'"),
    ("tokenizer does not fit the teacher", lambda r, f: (
        set_path(r, "model.teacher", {"pretrained": str(f["small_vocab_teacher"])}),
        set_path(r, "model.tokenizer", str(f["tokenizer"]))), [],
     r"model\.tokenizer \(.*tokenizer\) has 18 tokens but model\.teacher\.pretrained \(.*small_vocab_teacher\) has vocab_size 10"),
    # --- a Transformer teacher (methods.md §13)
    ("attention field on a Mamba teacher", lambda r, f: set_path(r, "model.teacher.train_from_scratch.num_attention_heads", 2),
     [], r"model\.teacher\.train_from_scratch: .*num_attention_heads does not apply to architecture 'mamba'"),
    ("unknown teacher architecture", lambda r, f: set_path(r, "model.teacher.train_from_scratch.architecture", "gpt2"),
     [], r"model\.teacher\.train_from_scratch\.architecture: Input should be 'mamba' or 'llama'"),
    ("keep_attention with a Mamba teacher", lambda r, f: r["stages"].update(distill={"keep_attention": [0]}), [],
     r"stages\.distill\.keep_attention: the teacher is a Mamba"),
    ("keep_attention layer out of range", lambda r, f: (
        set_path(r, "model.teacher.train_from_scratch", {"architecture": "llama", "hidden_size": 16, "num_hidden_layers": 2}),
        r["stages"].update(distill={"keep_attention": [2]})), [],
     r"stages\.distill\.keep_attention: 2 is not a layer id of the teacher \(0\.\.1\)"),
]


@pytest.mark.parametrize("case_id, change, extra, message", CASES, ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_one_clear_message_and_no_run_folder(case_id, change, extra, message, tmp_path, inputs, capsys):
    run_dir = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        recipe = base_recipe(run_dir)
        if change is not None:
            change(recipe, inputs)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    before = snapshot(tmp_path)

    overrides = [item for item in extra if "=" in item]
    options = [item for item in extra if "=" not in item]
    assert main(["run", str(path), *overrides, *options]) == 2

    err = capsys.readouterr().err
    print(err)
    assert err.startswith("spikerl: error: ") and err.count("spikerl: error:") == 1
    assert "Traceback" not in err
    assert __import__("re").search(message, err), f"expected /{message}/ in: {err}"
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    assert snapshot(tmp_path) == before  # nothing else written either (inputs, recipe)


def test_the_table_covers_at_least_30_cases():
    assert len(CASES) >= 30


def test_bad_input_on_an_existing_run_leaves_it_untouched(tmp_path, tmp_path_factory, capsys):
    """A mistake noticed at preflight does not touch a run folder that already holds finished stages."""
    recipe_path, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["stages"]["data"]["source"] = files_source(tmp_path / "missing.jsonl")  # data would re-run
    recipe_path.write_text(yaml.safe_dump(recipe))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert main(["run", str(recipe_path)]) == 2
    assert "stages.data.source.files: file not found" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_reward_that_raises_fails_rl_naming_it_and_keeps_finished_stages(tmp_path, tmp_path_factory):
    from rewards import RewardError
    from pipeline.manifest import read_manifest

    recipe_path, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["stages"]["rl"]["rewards"] = ["arith_exact", "tests.faults.helpers.raising_reward"]
    recipe_path.write_text(yaml.safe_dump(recipe))
    finished = {name: snapshot(run_dir / name) for name in ("data", "teacher", "distill", "sparsify")}

    with pytest.raises(RewardError, match=r"reward 'tests\.faults\.helpers\.raising_reward' raised KeyError: 'answer_text'"):
        main(["run", str(recipe_path)])
    assert read_manifest(run_dir / "rl") is None
    assert {name: snapshot(run_dir / name) for name in finished} == finished
    assert not (run_dir / ".lock").exists()
