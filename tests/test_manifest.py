"""Manifests: atomic writes, fingerprints, and the run lock."""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import types

import pytest

from pipeline import UserError
from pipeline.manifest import (
    RunLock,
    changed_code,
    code_version,
    fingerprint,
    read_manifest,
    versions,
    write_json_atomic,
    write_manifest,
)


# --------------------------------------------------------------------------------- atomic writes


def test_write_is_complete_and_leaves_no_temp_file(tmp_path):
    write_manifest(tmp_path, {"stage": "a", "metrics": {"loss": 0.25}})
    assert read_manifest(tmp_path) == {"stage": "a", "metrics": {"loss": 0.25}}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_write_interrupted_before_rename_leaves_no_manifest(tmp_path, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and the rename

    monkeypatch.setattr("pipeline.manifest.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(tmp_path, {"stage": "a"})
    assert list(tmp_path.iterdir()) == []  # no manifest, no half-written temp file
    assert read_manifest(tmp_path) is None


def test_interrupted_rewrite_keeps_the_old_file_whole(tmp_path, monkeypatch):
    write_json_atomic(tmp_path / "attempt.json", {"fingerprint": "old"})

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr("pipeline.manifest.os.replace", crash)
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "attempt.json", {"fingerprint": "new" * 1000})
    assert json.loads((tmp_path / "attempt.json").read_text()) == {"fingerprint": "old"}


def test_unreadable_manifest_counts_as_absent(tmp_path, caplog):
    (tmp_path / "manifest.json").write_text('{"stage": "a", "fingerpr')  # e.g. edited by hand
    assert read_manifest(tmp_path) is None
    assert "ignoring unreadable" in caplog.text


def test_versions_names_the_libraries():
    found = versions()
    assert list(found) == ["torch", "transformers", "trl", "datasets", "accelerate", "peft", "python"]
    assert found["transformers"] == "5.24.0" and found["python"].startswith("3.")


# ---------------------------------------------------------------------------------- fingerprints


BASE = dict(stage="teacher", config={"max_steps": 10, "lr": 0.003}, upstream={"data": "f" * 64},
            model={"teacher": {"hidden_size": 16}}, seed=0, code={"stages/teacher.py": "c" * 64})


def test_fingerprint_is_a_stable_sha256():
    fp = fingerprint(**BASE)
    assert len(fp) == 64 and int(fp, 16) >= 0
    reordered = dict(BASE, config={"lr": 0.003, "max_steps": 10})  # key order does not matter
    assert fingerprint(**reordered) == fp


@pytest.mark.parametrize(
    "change",
    [
        {"config": {"max_steps": 11, "lr": 0.003}},
        {"config": {"max_steps": 10, "lr": 0.003, "extra": None}},
        {"upstream": {"data": "e" * 64}},
        {"upstream": {}},
        {"model": {"teacher": {"hidden_size": 32}}},
        {"seed": 1},
        {"code": {"stages/teacher.py": "d" * 64}},
        {"stage": "distill"},
    ],
)
def test_fingerprint_changes_with_each_input(change):
    assert fingerprint(**dict(BASE, **change)) != fingerprint(**BASE)


def test_code_version_hashes_the_stage_source(tmp_path):
    source = tmp_path / "stage_x.py"
    source.write_text("def run(cfg, ctx):\n    return {}\n")
    module = types.SimpleNamespace(__file__=str(source), __name__="stage_x")
    first = code_version(module)
    assert first == code_version(module) and list(first) == ["stage_x.py"]
    source.write_text("def run(cfg, ctx):\n    return {'changed': 1}\n")
    assert changed_code(first, code_version(module)) == ["stage_x.py"]


def test_code_files_follow_the_project_imports_transitively(tmp_path):
    # a stage outside the project that imports one project module inside a function (a lazy import)
    source = tmp_path / "stage_y.py"
    source.write_text("import json\n\ndef run(cfg, ctx):\n    from rewards.tasks import arith_exact\n    return {}\n")
    files = set(code_version(types.SimpleNamespace(__file__=str(source), __name__="stage_y")))
    assert {"stage_y.py", "rewards/__init__.py", "rewards/tasks.py"} <= files  # the package runs first
    assert "rewards/energy.py" in files  # rewards/__init__ imports .energy (a relative import)
    assert "spiking/neurons.py" in files  # ... which imports spiking, whose __init__ imports .neurons
    assert not any(f.startswith(("pipeline/", "stages/")) for f in files)

    real = {name: set(code_version(importlib.import_module(f"stages.{module}"))) for name, module in
            (("data", "data"), ("distill", "distill"), ("rl", "rl"), ("eval", "evaluate"))}
    assert "spiking/neurons.py" not in real["data"] and "stages/context.py" in real["data"]
    assert {"spiking/neurons.py", "spiking/modeling.py", "stages/training.py", "stages/tasks.py"} <= real["distill"]
    # the C++ kernels the scan dispatch builds are hashed with the module that builds them
    assert {"spiking/cpu_kernels.py", "spiking/cpu_kernels.cpp"} <= real["distill"]
    assert not any(f.startswith("rewards/") for f in real["distill"])
    assert {"rewards/tasks.py", "stages/ppo.py", "stages/training.py"} <= real["rl"]
    assert "stages/report.py" in real["eval"]


# -------------------------------------------------------------------------------------- run lock


def test_lock_holds_pid_and_host_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not (tmp_path / ".lock").exists()


def test_second_lock_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire()  # free again after release


def test_lock_of_a_live_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer exists
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="spikerl"):
        with RunLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {tmp_path / '.lock'} of pid {dead.pid}" in caplog.text


@pytest.mark.parametrize("content", [json.dumps({"pid": 999999, "host": "another-host"}), ""])
def test_lock_from_another_host_or_unreadable_is_refused(tmp_path, content):
    (tmp_path / ".lock").write_text(content)  # cannot check another machine's pids; "" = being written
    with pytest.raises(UserError, match="is in use by pid"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == content


def test_release_never_deletes_a_lock_taken_over_by_another_process(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    lock.release()
    assert (tmp_path / ".lock").exists()
