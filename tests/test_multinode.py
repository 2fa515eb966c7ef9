"""Two machines for real, on one host: two `accelerate launch` processes joined over loopback.

Each launcher is what a user runs on one node of a cluster (recipes/accelerate/zero3_multinode.yaml:
DeepSpeed ZeRO-3, static rendezvous, one process per "machine" here, gloo on CPU):

    accelerate launch --config_file recipes/accelerate/zero3_multinode.yaml --num_machines 2 \\
        --num_processes 2 --machine_rank {0|1} --main_process_ip 127.0.0.1 --main_process_port P \\
        -m pipeline run RECIPE

The tiny recipe runs through distill: one manifest per stage written by the 2-process run, the
student loads whole. Then the same launch is started again on a fresh folder, node 1's launcher is
SIGKILLed in the middle of distill (the launcher and every process under it: its machine dies), node 0
fails on the lost peer (or is stopped like a scheduler would stop it), and launching both nodes
again resumes distill from its newest checkpoint and finishes it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import spiking  # noqa: F401  registers SpikingMamba with AutoModelForCausalLM
from pipeline.manifest import read_manifest
from tests.faults.helpers import ROOT, TINY_MODEL, TINY_STAGES, complete_checkpoints, write_recipe

pytest.importorskip("deepspeed")
CONFIG = ROOT / "recipes" / "accelerate" / "zero3_multinode.yaml"
ACCELERATE = Path(sys.executable).parent / "accelerate"
STAGES = {
    "data": TINY_STAGES["data"],
    "teacher": {**TINY_STAGES["teacher"], "max_steps": 12, "save_steps": 6},
    "distill": {**TINY_STAGES["distill"], "max_steps": 30, "save_steps": 5},
}
# the run that is killed: long enough that node 1 dies well before the last step
KILLED_STAGES = {**STAGES, "distill": {**STAGES["distill"], "max_steps": 400, "save_steps": 10}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(rank: int, recipe: Path, port: int, log: Path) -> subprocess.Popen:
    """One machine's launcher (in a process group of its own, so a kill takes its worker too)."""
    command = [
        str(ACCELERATE), "launch", "--config_file", str(CONFIG), "--num_machines", "2", "--num_processes", "2",
        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "-m", "pipeline", "run", str(recipe),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_two_nodes(recipe: Path, logs: Path, timeout: float = 400) -> list[int]:
    port = free_port()
    nodes = [start_node(rank, recipe, port, logs / f"node{rank}.log") for rank in (0, 1)]
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_machine(node)


def kill_machine(node: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, as when its machine dies (torch's elastic agent
    starts its workers in sessions of their own, so the launcher's process group alone misses them)."""
    import psutil

    root = psutil.Process(node.pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    node.wait()


def log_tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("node*.log")))


@pytest.mark.slow
def test_two_machines_run_distill_and_resume_after_one_is_killed(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "run", stages=STAGES, model=TINY_MODEL)
    codes = run_two_nodes(recipe, tmp_path)
    assert codes == [0, 0], log_tail(tmp_path)
    for stage in STAGES:
        manifest = read_manifest(tmp_path / "run" / stage)
        assert manifest is not None and manifest["num_processes"] == 2, stage
        assert len(list((tmp_path / "run" / stage).glob("manifest*"))) == 1
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "distill")
    assert not any(p.numel() == 0 for p in student.parameters())  # gathered, not a ZeRO-3 shard
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert read_manifest(tmp_path / "run" / "distill")["metrics"]["steps"] == STAGES["distill"]["max_steps"]

    # a fresh run; node 1 dies (SIGKILL of its launcher's process group) once distill has a checkpoint
    second = tmp_path / "second"
    second.mkdir()
    recipe = write_recipe(second, second / "run", stages=KILLED_STAGES, model=TINY_MODEL)
    port = free_port()
    nodes = [start_node(rank, recipe, port, second / f"node{rank}.log") for rank in (0, 1)]
    deadline = time.time() + 400
    try:
        while not complete_checkpoints(second / "run" / "distill"):
            assert time.time() < deadline and all(n.poll() is None for n in nodes), log_tail(second)
            time.sleep(0.1)
        kill_machine(nodes[1])
        try:  # the survivor fails on its lost peer; a scheduler would stop it otherwise
            code0 = nodes[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            kill_machine(nodes[0])
            code0 = nodes[0].returncode
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_machine(node)
    assert code0 != 0
    distill = second / "run" / "distill"
    assert read_manifest(distill) is None  # not marked done
    saved = complete_checkpoints(distill)
    assert saved and saved[-1] < KILLED_STAGES["distill"]["max_steps"]
    teacher_output = read_manifest(second / "run" / "teacher")["output_id"]  # done before the kill

    for log in second.glob("node*.log"):
        log.rename(log.with_suffix(".killed.log"))
    codes = run_two_nodes(recipe, second)
    assert codes == [0, 0], log_tail(second)
    manifest = read_manifest(distill)
    assert manifest is not None and manifest["num_processes"] == 2
    assert manifest["metrics"]["steps"] == KILLED_STAGES["distill"]["max_steps"]
    run_log = (second / "run" / "run.log").read_text()
    assert f"resuming the interrupted attempt from {distill / 'checkpoints' / f'checkpoint-{saved[-1]}'}" in run_log
    assert read_manifest(second / "run" / "teacher")["output_id"] == teacher_output  # skipped, not redone
    AutoModelForCausalLM.from_pretrained(distill)
