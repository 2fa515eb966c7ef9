"""Fingerprints follow the code a stage runs: edit a copy of the project tree, read `spikerl status`.

A finished tiny run (data, teacher, distill, sparsify, rl) is checked by `python -m pipeline status`
running from a copy of the four project packages. Its stages are `done` (fingerprints hold no
paths, so the copy's untouched code gives the same ones); then one file of the copy is edited and
the states must change exactly for the stages that import it:

* spiking/neurons.py (the model's neurons): teacher and every stage after it; data stays done;
* rewards/tasks.py (a reward): rl only;
* stages/training.py (the shared toolkit): teacher, distill, sparsify, rl; data stays done.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.helpers import ROOT, copy_run, finished_run

PACKAGES = ("pipeline", "stages", "spiking", "rewards")


@pytest.fixture(scope="module")
def finished_with_rl(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run_dir): the faults suite's finished run plus its rl stage, in a folder of its own."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    folder = tmp_path_factory.mktemp("fingerprints")
    recipe, run_dir = copy_run(finished_run(tmp_path_factory), folder)
    run_recipe(load_recipe(recipe), until="rl")
    return recipe, run_dir


def status(tree: Path, recipe: Path) -> dict[str, tuple[str, str]]:
    """stage -> (state, note) from `python -m pipeline status RECIPE` run with the code in `tree`."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", str(recipe)], cwd=tree, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines()[2:]:
        cells = line.split()
        if cells and cells[0] in ("data", "teacher", "distill", "sparsify", "rl", "eval"):
            state = "not in recipe" if cells[1] == "not" else cells[1]
            rows[cells[0]] = (state, line)
    return rows


def states(rows: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {stage: state for stage, (state, _) in rows.items()}


def test_editing_a_file_marks_exactly_the_stages_that_import_it(tmp_path, finished_with_rl):
    recipe, _ = finished_with_rl
    tree = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = {"data": "done", "teacher": "done", "distill": "done", "sparsify": "done", "rl": "done", "eval": "not in recipe"}
    assert states(status(tree, recipe)) == done

    def edit(rel: str) -> str:
        original = (tree / rel).read_text()
        (tree / rel).write_text(original + "\n# an edit of a comment still counts: the file's bytes are hashed\n")
        return original

    original = edit("spiking/neurons.py")
    rows = status(tree, recipe)
    assert states(rows) == done | {s: "stale" for s in ("teacher", "distill", "sparsify", "rl")}
    assert "the code changed: spiking/neurons.py" in rows["distill"][1]
    (tree / "spiking/neurons.py").write_text(original)

    original = edit("rewards/tasks.py")
    rows = status(tree, recipe)
    assert states(rows) == done | {"rl": "stale"}
    assert "the code changed: rewards/tasks.py" in rows["rl"][1]
    (tree / "rewards/tasks.py").write_text(original)

    edit("stages/training.py")
    assert states(status(tree, recipe)) == done | {s: "stale" for s in ("teacher", "distill", "sparsify", "rl")}
