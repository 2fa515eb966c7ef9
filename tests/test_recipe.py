"""Recipe validation: every mistake is one clear error naming the file and the dotted path, and
a bad recipe changes nothing on disk (checked through `spikerl run`, on a missing and on an
existing run folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pipeline.recipe as recipe_module
from pipeline.__main__ import main
from pipeline.recipe import RecipeError, load_recipe

FAKE_STAGE = '''
"""Test-only stage with a small typed config."""
from typing import Literal
from pydantic import Field
from stages.context import StrictModel


class Inner(StrictModel):
    kind: Literal["si_lif", "atmn"] = Field("si_lif", description="neuron kind")
    D: int = Field(4, ge=1, description="levels")


class Config(StrictModel):
    max_steps: int = Field(3, gt=0, description="steps")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    flag: bool = Field(False, description="a switch")
    neuron: Inner = Field(default_factory=Inner, description="nested section")


def run(cfg, ctx):
    (ctx.out_dir / "out.txt").write_text(str(cfg.max_steps))
    return {"max_steps": cfg.max_steps}
'''


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    folder = tmp_path / "fake_stage_modules"
    folder.mkdir()
    names = {"a": "fake_recipe_stage_a", "b": "fake_recipe_stage_b", "later": "fake_recipe_stage_not_written"}
    for stage, module in names.items():
        if stage != "later":
            (folder / f"{module}.py").write_text(FAKE_STAGE)
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(recipe_module, "STAGES", names)
    yield folder
    for module in names.values():
        sys.modules.pop(module, None)


def write(tmp_path: Path, text: str, name="x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("RUN_DIR", str(tmp_path / "run")))
    return path


GOOD = """
run: {name: t, output_dir: RUN_DIR, seed: 1}
stages:
  b: {max_steps: 5}
  a:
"""


def snapshot(folder: Path) -> dict[str, int] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))} | {
        ".": folder.stat().st_mtime_ns
    }


def test_good_recipe_defaults_order_and_round_trip(tmp_path, fake_stages):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert list(recipe.stages) == ["a", "b"]  # pipeline order, not file order
    assert recipe.stages["a"].max_steps == 3  # `a:` with nothing = defaults
    assert recipe.stages["b"].max_steps == 5
    assert recipe.run.seed == 1 and recipe.run_dir == tmp_path / "run"
    assert recipe.model.teacher.train_from_scratch.hidden_size == 128  # ModelConfig default
    resolved = write(tmp_path, recipe.to_yaml(), name="resolved.yaml")
    assert load_recipe(resolved).to_dict() == recipe.to_dict()


def test_default_run_dir_is_runs_name(tmp_path, fake_stages):
    recipe = load_recipe(write(tmp_path, "run: {name: demo}\nstages: {a: {}}\n"))
    assert recipe.run_dir == Path("runs/demo")


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("stages: {a: {max_stepz: 3}}", [], "x.yaml: stages.a.max_stepz: unknown key (allowed: max_steps, lr, flag, neuron)"),
        ("stages: {a: {max_steps: -1}}", [], "x.yaml: stages.a.max_steps: Input should be greater than 0"),
        ("stages: {a: {max_steps: many}}", [], "x.yaml: stages.a.max_steps: Input should be a valid integer"),
        ("stages: {a: {neuron: {D: 0}}}", [], "x.yaml: stages.a.neuron.D: Input should be greater than or equal to 1"),
        ("stages: {a: {neuron: {kind: lif}}}", [], "x.yaml: stages.a.neuron.kind: Input should be 'si_lif' or 'atmn'"),
        ("runn: {name: t}\nstages: {a: {}}", [], "x.yaml: runn: unknown key (allowed: run, model, stages)"),
        ("run: {seed: -3}\nstages: {a: {}}", [], "x.yaml: run.seed: Input should be greater than or equal to 0"),
        ("model: {teacher: {train_from_scratch: {hidden_size: 4}}}\nstages: {a: {}}", [],
         "x.yaml: model.teacher.train_from_scratch.hidden_size: Input should be greater than or equal to 8"),
        ("stages: {z: {}}", [], "x.yaml: stages.z: unknown stage (known stages: a, b, later)"),
        ("stages: {later: {}}", [], "x.yaml: stages.later: stage 'later' is not implemented yet (no module fake_recipe_stage_not_written)"),
        ("stages: {}", [], "x.yaml: stages: the recipe runs no stage"),
        ("stages: [a, b]", [], "x.yaml: stages: should be a mapping"),
        ("", [], "x.yaml: the recipe is empty"),
        ("- a\n- b", [], "x.yaml: a recipe is a mapping"),
        ("stages: {a: {max_steps: 3}", [], "x.yaml: not valid YAML"),
        ("stages: {a: {}}", ["stages.a.max_steps=0"],
         "x.yaml: stages.a.max_steps: Input should be greater than 0 (set on the command line: stages.a.max_steps=0)"),
        ("stages: {a: {}}", ["stages.a.lr=fast"], "x.yaml: stages.a.lr: Input should be a valid number"),
        ("stages: {a: {}}", ["stages.a.nope=1"], "x.yaml: stages.a.nope: unknown key (allowed: max_steps, lr, flag, neuron)"),
        ("stages: {a: {}}", ["stages.b.max_steps=1"], "override 'stages.b.max_steps=1': stage 'b' is not in"),
        ("run: {seed: 0}\nstages: {a: {}}", ["run.seed.x=1"], "override 'run.seed.x=1': run.seed is a value"),
        ("stages: {a: {}}", ["stages.a.max_steps"], "override 'stages.a.max_steps': expected dotted.path=value"),
    ],
)
def test_bad_recipe_one_clear_error(tmp_path, fake_stages, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert str(err.value).startswith(message.replace("x.yaml", str(path))), str(err.value)


def test_all_problems_in_one_message(tmp_path, fake_stages):
    path = write(tmp_path, "stages: {a: {max_steps: 0, lr: -1, extra: 1}}")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    lines = str(err.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["stages.a.max_steps", "stages.a.lr", "stages.a.extra"]
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_overrides_are_typed_like_the_file(tmp_path, fake_stages):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(
        path, ["stages.a.max_steps=7", "stages.a.lr=3e-3", "stages.a.flag=true", "stages.a.neuron.D=2", "run.seed=5",
               "model.teacher.train_from_scratch.num_hidden_layers=2"]
    )
    cfg = recipe.stages["a"]
    assert (cfg.max_steps, cfg.lr, cfg.flag, cfg.neuron.D) == (7, 0.003, True, 2)
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.lr, float)
    assert recipe.run.seed == 5 and recipe.model.teacher.train_from_scratch.num_hidden_layers == 2
    assert recipe.stages["b"].max_steps == 5  # untouched
    assert "stages.a.max_steps=7" in recipe.to_yaml().splitlines()[0]


def test_yaml_is_read_safely(tmp_path, fake_stages):
    path = write(tmp_path, "stages: {a: {max_steps: !!python/object/apply:os.getpid []}}")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path, fake_stages):
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("run: {output_dir: RUN_DIR}\nstages: {a: {max_stepz: 3}}", []),
        ("run: {output_dir: RUN_DIR}\nstages: {a: {max_steps: -1}}", []),
        ("run: {output_dir: RUN_DIR}\nstages: {a: {}}", ["stages.a.max_steps=abc"]),
        ("run: {output_dir: RUN_DIR}\nstages: {a: {}}", ["stages.a.unknown=1"]),
        ("run: {output_dir: RUN_DIR}\nstages: {a: {}, later: {}}", []),
        (None, []),  # the recipe file does not exist
    ],
)
@pytest.mark.parametrize("run_dir_exists", [False, True])
def test_bad_recipe_changes_nothing_on_disk(tmp_path, fake_stages, capsys, text, overrides, run_dir_exists):
    run_dir = tmp_path / "run"
    if run_dir_exists:  # a previous good run in the same folder
        good = write(tmp_path, "run: {output_dir: RUN_DIR}\nstages: {a: {}}", name="good.yaml")
        assert main(["run", str(good)]) == 0
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.yaml"
    before = snapshot(run_dir)

    assert main(["run", str(path), *overrides]) == 2
    assert snapshot(run_dir) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spikerl: error: ") and str(path) in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string; a free-form block (`trl:`) would pass it on to TRL."""
    from pipeline.recipe import _apply_override, _load_yaml_text, _read_yaml

    assert _load_yaml_text("{lr: 1e-4, b: -2E+3, c: .5e1, d: 3.0e-5, e: 1e, f: e5}") == {
        "lr": 1e-4, "b": -2000.0, "c": 5.0, "d": 3e-5, "e": "1e", "f": "e5"}
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  rl:\n    trl: {learning_rate: 1e-4}\n")
    raw = _read_yaml(path)
    assert raw["stages"]["rl"]["trl"]["learning_rate"] == 1e-4
    _apply_override(raw, "stages.rl.trl.learning_rate=2e-5", path)
    assert isinstance(raw["stages"]["rl"]["trl"]["learning_rate"], float) and raw["stages"]["rl"]["trl"]["learning_rate"] == 2e-5
