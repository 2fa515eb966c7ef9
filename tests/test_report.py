"""The report, built from a finished tiny run made by the real runner (data, teacher, distill,
eval with lm-eval on the local task; sparsify and rl left out of the recipe): every number of the
side-by-side table and of the training table is read back from the file and key report.json
names, and the markdown shows exactly those values; the energy figures equal
spiking/energy.py's on the same held-out tokens, for the saved HF teacher and the saved student;
the stages the recipe does not run are shown as missing, not zero; `spikerl report` rebuilds it
from the files alone and refuses a run without eval metrics.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

import spiking
from pipeline.__main__ import main
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from stages import report as report_lib

ROOT = Path(__file__).resolve().parents[1]
EVAL_BLOCKS = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run, through the real runner (about 15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("tiny")
    recipe = {
        "run": {"name": "tiny-report", "output_dir": str(root / "run"), "seed": 0},
        "model": {"teacher": {"train_from_scratch": {"hidden_size": 16, "num_hidden_layers": 2, "state_size": 4}}},
        "stages": {
            "data": {"source": {"synthetic": "arithmetic", "digits": [2], "num_problems": 300}, "test_size": 16,
                     "rl_prompts": 8, "seq_len": 12},
            "teacher": {"max_steps": 4, "batch_size": 8, "logging_steps": 1, "eval_samples": 16, "eval_blocks": EVAL_BLOCKS},
            "distill": {"max_steps": 4, "batch_size": 8, "logging_steps": 1, "eval_samples": 16, "eval_blocks": EVAL_BLOCKS},
            "eval": {"lm_eval": ["arith_mc"], "lm_eval_include_path": str(ROOT / "recipes" / "lm_eval_tasks"),
                     "lm_eval_limit": 12, "eval_samples": 16, "eval_blocks": EVAL_BLOCKS},
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(path))
    return root / "run"


@pytest.fixture(scope="module")
def built(run_dir) -> dict:
    return json.loads((run_dir / "eval" / "report" / "report.json").read_text())


def test_every_number_comes_from_a_manifest_a_log_or_the_eval_metrics(run_dir, built):
    checked = 0
    for row in built["rows"]:
        for header, cell in {**row.get("cells", {}), **row.get("cost_cells", {})}.items():
            assert report_lib.lookup(run_dir, cell["source"]) == cell["value"], (row["stage"], header, cell)
            checked += 1
    for row in built["training"]:
        for key, cell in row.items():
            if isinstance(cell, dict):
                assert report_lib.lookup(run_dir, cell["source"]) == cell["value"], (row["stage"], key, cell)
                checked += 1
    for comparison in built["paper_comparison"]:
        for cell in comparison["ours"]:
            assert report_lib.lookup(run_dir, cell["source"]) == cell["value"]
    print("numbers checked against their source:", checked)
    assert checked >= 2 * 8 + 3  # teacher and distill rows, plus the training table

    # the eval metrics themselves are the ones the eval stage returned to its manifest
    manifest = json.loads((run_dir / "eval" / "manifest.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert manifest["metrics"]["distill/energy_pj_per_token"] == metrics["stages"]["distill"]["energy"]["pj_per_token"]
    assert manifest["metrics"]["teacher/lm_eval/arith_mc"] == metrics["stages"]["teacher"]["lm_eval"]["arith_mc"]["acc"]


def markdown_rows(markdown: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose first header is `first_header`: first cell -> cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_markdown_table_shows_exactly_the_sourced_values_and_missing_stages(run_dir, built):
    markdown = (run_dir / "eval" / "report" / "report.md").read_text()
    table = markdown_rows(markdown, "stage")
    assert list(table) == ["teacher", "distill", "sparsify", "rl"]
    for row in built["rows"]:
        if row["status"] != "evaluated":
            continue
        expected = [
            "dense" if cell["kind"] == "firing_rate" and not row["spiking"] else report_lib.format_cell(cell["kind"], cell["value"])
            for cell in row["cells"].values()
        ]
        assert table[row["stage"]] == expected
    for stage in ("sparsify", "rl"):  # not in the recipe: missing, never a zero
        assert table[stage][0] == "missing" and set(table[stage][1:]) == {"-"}
        assert not any(re.fullmatch(r"0(\.0+)?%?x?", cell) for cell in table[stage])
    assert "sparsify: not in this run's recipe" in markdown
    manifest = json.loads((run_dir / "eval" / "manifest.json").read_text())
    assert manifest["metrics"]["rl/status"] == "missing" and "rl/accuracy" not in manifest["metrics"]
    # every cost model side by side, the memory-inclusive one never left out
    by_cost = markdown_rows(markdown.split("## Energy by cost model")[1], "stage")
    assert list(by_cost) == ["distill"]  # the spiking stages evaluated
    distill = next(row for row in built["rows"] if row["stage"] == "distill")
    assert by_cost["distill"] == [report_lib.format_cell(c["kind"], c["value"]) for c in distill["cost_cells"].values()]
    headers = built["cost_model_columns"]
    assert any("45nm-memory" in h for h in headers) and any("INT8" in h for h in headers) and any("break-even" in h for h in headers)
    ratios = {h: distill["cost_cells"][h]["value"] for h in headers if h.startswith("ratio")}
    assert all(value is not None and value > 0 for value in ratios.values()), ratios
    for name in ("45nm-horowitz", "45nm-int8", "45nm-memory"):
        assert f"* `{name}`: " in markdown
    # machine, date and what the energy leaves out are stated
    assert "memory access not counted" in markdown and "45nm-horowitz" in markdown and "Measured 20" in markdown
    # the papers' figures are there, marked as the paper's
    assert "4.76x SpikingMamba-1.3B (paper)" in markdown
    for name in ("firing_rate_by_layer.png", "energy_by_op.png", "training_curves.png", "accuracy_vs_energy.png"):
        assert (run_dir / "eval" / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown


def test_report_energy_equals_spiking_energy_on_the_same_tokens(run_dir, built):
    blocks = load_from_disk(str(run_dir / "data" / "corpus"))["test"].select(range(EVAL_BLOCKS))
    ids = torch.tensor(blocks["input_ids"])  # [EVAL_BLOCKS, L]: the eval stage's held-out tokens
    # the folders as saved: an HF MambaForCausalLM teacher and the spiking student
    teacher = AutoModelForCausalLM.from_pretrained(run_dir / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill").eval()
    assert type(teacher).__name__ == "MambaForCausalLM"
    expected = {"teacher": spiking.estimate_energy(teacher, ids).pj_per_token,
                "distill": spiking.estimate_energy(student, ids).pj_per_token}
    table = markdown_rows((run_dir / "eval" / "report" / "report.md").read_text(), "stage")
    headers = built["columns"]
    for row in built["rows"]:
        if row["stage"] not in expected:
            continue
        energy = row["cells"]["energy pJ/token (45nm-horowitz)"]["value"]
        ratio = row["cells"]["energy ratio 45nm-horowitz (teacher / stage)"]["value"]
        print(row["stage"], "report:", energy, "energy.py:", expected[row["stage"]])
        assert energy == pytest.approx(expected[row["stage"]], rel=1e-12)
        assert ratio == pytest.approx(expected["teacher"] / expected[row["stage"]], rel=1e-12)
        assert table[row["stage"]][headers.index("energy pJ/token (45nm-horowitz)")] == f"{expected[row['stage']]:.0f}"


def test_lm_eval_scores_the_local_task_for_teacher_and_student(built):
    cells = {row["stage"]: row["cells"]["lm-eval arith_mc"]["value"] for row in built["rows"] if row["status"] == "evaluated"}
    assert set(cells) == {"teacher", "distill"}
    assert all(0.0 <= value <= 1.0 for value in cells.values())


def test_spikerl_report_rebuilds_it_from_the_files_and_refuses_a_run_without_eval(run_dir, tmp_path, capsys, built):
    out = tmp_path / "rebuilt"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    rebuilt = json.loads((out / "report.json").read_text())
    assert rebuilt["rows"] == built["rows"]
    # the same training rows, plus eval's own, whose manifest exists now (the stage wrote its report before it)
    assert [r for r in rebuilt["training"] if r["stage"] != "eval"] == built["training"]
    assert [r["stage"] for r in rebuilt["training"]] == ["data", "teacher", "distill", "eval"]

    empty = tmp_path / "run-without-eval"
    (empty / "teacher").mkdir(parents=True)
    assert main(["report", str(empty)]) == 2
    assert "eval/metrics.json: no eval metrics; run the eval stage first" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_the_hf_teacher_and_the_student_carry_model_cards(run_dir):
    """The plain-Mamba teacher's card (transformers' own class: one way to load) beside the
    student's (both ways); each with the figures of its manifest."""
    from huggingface_hub import ModelCard

    teacher_card = ModelCard.load(run_dir / "teacher" / "README.md")
    assert "custom_code" not in teacher_card.data.tags and "trust_remote_code=True)" not in teacher_card.text
    assert "MambaForCausalLM` (transformers' own class" in teacher_card.text
    manifest = json.loads((run_dir / "teacher" / "manifest.json").read_text())
    assert {r.metric_type: r.metric_value for r in teacher_card.data.eval_results} == {
        "accuracy": manifest["metrics"]["teacher_accuracy"], "perplexity": manifest["metrics"]["teacher_ppl"]}
    student_card = ModelCard.load(run_dir / "distill" / "README.md")
    assert "custom_code" in student_card.data.tags and "trust_remote_code=True)" in student_card.text
    assert not (run_dir / "eval" / "README.md").exists()  # eval holds no model
