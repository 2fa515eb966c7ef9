"""The command line: exit codes, one-line errors, `status` table, `--help`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_runner import fake_stages, write_recipe  # noqa: F401  (fixture)

from pipeline.__main__ import main


def status_rows(capsys) -> dict[str, list[str]]:
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["stage", "state", "fingerprint", "wall", "metrics", "note"]
    rows = {}
    for line in lines[2:]:
        cells = line.split("  ")
        cells = [c.strip() for c in cells if c.strip()]
        rows[cells[0]] = cells[1:]
    return rows


def test_run_then_status(tmp_path, fake_stages, capsys):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {}})
    assert main(["run", str(path)]) == 0
    assert main(["status", str(path)]) == 0
    rows = status_rows(capsys)
    assert rows["a"][:2] == ["done", "match"] and rows["a"][2].endswith(" s")
    assert rows["a"][3] == "steps=3 resumed_from=0 loss=0.5"
    assert rows["c"] == ["not in recipe", "-", "-", "-"]
    assert rows["d"] == ["not in recipe", "-", "-", "-"]


def test_status_of_a_manifest_from_another_recipe_is_stale(tmp_path, fake_stages, capsys):
    first = write_recipe(tmp_path, stages={"a": {}, "b": {"steps": 2}}, name="first.yaml")
    other = write_recipe(tmp_path, stages={"a": {}, "b": {"steps": 4}}, name="other.yaml")  # same run folder
    assert main(["run", str(first)]) == 0
    capsys.readouterr()
    assert main(["status", str(other)]) == 0
    rows = status_rows(capsys)
    assert rows["a"][:2] == ["done", "match"]
    assert rows["b"][:2] == ["stale", "differs"]
    assert rows["b"][-1] == "stages.b changed: steps 2 -> 4"
    # An override is the same as another recipe; status writes nothing.
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert main(["status", str(first), "run.seed=3"]) == 0
    assert [r[:2] for r in status_rows(capsys).values()][:2] == [["stale", "differs"], ["stale", "differs"]]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_status_shows_interrupted_pending_and_lock(tmp_path, fake_stages, capsys):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {}, "c": {}})
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere"}))
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(locked by pid 4242 on elsewhere)" in out.splitlines()[0]
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert rows == {"a": "interrupted", "b": "pending", "c": "pending", "d": "not"}


def test_user_errors_exit_2_with_one_line(tmp_path, fake_stages, capsys):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {}})
    cases = [
        (["run", str(tmp_path / "missing.yaml")], "recipe file not found"),
        (["run", str(path), "stages.a.steps=-1"], "stages.a.steps: Input should be greater than 0"),
        (["run", str(path), "--from", "zz"], "--from zz: not a stage of"),
        (["run", str(path), "--only", "b"], "--only b: the stages before it must be done"),
        (["status", str(path), "stages.a.what=1"], "stages.a.what: unknown key"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("spikerl: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_lock_held_exits_2_naming_pid(tmp_path, fake_stages, capsys):
    path = write_recipe(tmp_path, stages={"a": {}})
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert main(["run", str(path)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by pid {holder.pid}" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, fake_stages):
    path = write_recipe(tmp_path, stages={"a": {}, "b": {}})
    assert main(["run", str(path), "--until", "a", "stages.a.tag=q"]) == 0
    assert (tmp_path / "run" / "a" / "out.txt").read_text() == "q"
    assert not (tmp_path / "run" / "b").exists()
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["stages"]["a"] == {"steps": 3, "tag": "q"}


def test_bad_arguments_are_argparse_errors(capsys):
    for argv in (["run"], ["fly", "x.yaml"], ["run", "x.yaml", "--bogus"], ["run", "x.yaml", "notakeyvalue"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "usage: spikerl" in capsys.readouterr().err


def test_help_explains_commands_with_examples():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "--help"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0
    for text in ("--from STAGE", "--only STAGE", "--until STAGE", "KEY=VALUE", "examples:", "spikerl status"):
        assert text in out.stdout
    top = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=root, capture_output=True, text=True)
    assert "run" in top.stdout and "status" in top.stdout and "report" in top.stdout


def test_status_names_a_stale_lock(tmp_path, fake_stages, capsys):
    path = write_recipe(tmp_path, stages={"a": {}})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert main(["status", str(path)]) == 0
    assert f"(stale lock of dead pid {dead.pid} on " in capsys.readouterr().out
