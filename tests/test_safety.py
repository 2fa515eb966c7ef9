"""Safety: no code runs from a file or a hub folder unless the recipe says so.

* pickle: nothing unpickles an untrusted file; every `torch.load` passes `weights_only=True`
  (a source scan), and a checkpoint holding a malicious pickle is refused on resume.
* remote code: `trust_remote_code` is never hard-coded to True (a source scan), and a local
  "pretrained" folder with custom code is refused unless `model.trust_remote_code: true`.
* YAML: only `yaml.safe_load` (a source scan), and a recipe or an override carrying a Python tag
  is an error, the tag never executed.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import main
from tests.faults.helpers import copy_run, finished_run

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("pipeline", "stages", "spiking", "rewards", "benchmarks", "scripts")


def project_calls():
    """(file, ast.Call, dotted name of the callee) for every call in the project's source."""
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path, node, ast.unparse(node.func)


def test_source_scan_finds_calls():  # the scans below would pass vacuously on an empty walk
    names = {name for _, _, name in project_calls()}
    assert {"yaml.safe_load", "AutoModelForCausalLM.from_pretrained"} <= names


def test_no_pickle_and_every_torch_load_is_weights_only():
    problems = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for m in modules):
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {modules}")
    for path, call, name in project_calls():
        if name == "torch.load":
            weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)} (needs weights_only=True)")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_never_hard_coded_on():
    problems = [
        f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}"
        for path, call, _ in project_calls()
        for keyword in call.keywords
        if keyword.arg == "trust_remote_code" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
        and "trust_remote_code" not in ast.unparse(keyword.value)  # must come from the recipe (model.trust_remote_code)
    ]
    assert not problems, "\n".join(problems)


def test_yaml_is_only_safe_loaded():
    unsafe = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
    problems = [f"{path.relative_to(ROOT)}:{call.lineno}: {name}" for path, call, name in project_calls() if name in unsafe]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------- behaviour


def test_recipe_with_a_python_tag_is_refused_and_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\nstages: {{data: {{}}}}\n")
    assert main(["run", str(recipe)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "ok.yaml"), f"run.name=!!python/object/apply:os.system ['touch {marker}']"]) == 2
    recipe.write_text("stages: {data: {}}\n")
    assert main(["status", str(recipe), f"run.name=!!python/object/apply:os.system ['touch {marker}']"]) == 2
    assert "the value is not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


EVIL_CONFIG = '''
from pathlib import Path
from transformers import PretrainedConfig

Path({marker!r}).write_text("imported")  # what remote code could do: anything


class EvilConfig(PretrainedConfig):
    model_type = "evil_mamba"
'''


def remote_code_folder(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_mamba", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
    }))
    return folder


def test_remote_code_runs_only_when_the_recipe_allows_it(tmp_path, capsys):
    import yaml

    from stages import teacher
    from stages.context import ModelConfig, StageContext, TeacherSource

    marker = tmp_path / "remote_code_ran"
    folder = remote_code_folder(tmp_path / "evil_model", marker)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"teacher": {"pretrained": str(folder)}},
        "stages": {"data": {"source": {"synthetic": "arithmetic", "num_problems": 100, "digits": [2]}}, "teacher": {}},
    }))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.teacher.pretrained: cannot load" in err and "trust_remote_code" in err
    assert not marker.exists() and not (tmp_path / "run").exists()

    # the switch is honoured: with it on, the same folder's code does run
    model = ModelConfig(teacher=TeacherSource(pretrained=str(folder)), trust_remote_code=True)
    ctx = StageContext("teacher", tmp_path / "run", tmp_path / "run" / "teacher", {}, model)
    with pytest.raises(ValueError):  # no tokenizer in the folder: but the config (remote code) loaded first
        teacher.preflight(teacher.Config(), ctx)
    assert marker.read_text() == "imported"


class Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_holding_a_malicious_pickle(tmp_path, tmp_path_factory):
    recipe, run_dir = copy_run(finished_run(tmp_path_factory), tmp_path)
    checkpoints = run_dir / "teacher" / "checkpoints"
    (run_dir / "teacher" / "manifest.json").unlink()  # interrupted: resumes from its newest checkpoint
    shutil.rmtree(checkpoints / "checkpoint-60")
    marker = tmp_path / "pwned"
    torch.save({"python": Payload(marker)}, checkpoints / "checkpoint-50" / "rng_state.pth")

    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        main(["run", str(recipe), "--until", "teacher"])
    assert not marker.exists()
