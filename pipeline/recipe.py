"""The recipe: one YAML file that says what a run does, checked in full before anything runs.

    run:    {name: tiny, output_dir: runs/tiny, seed: 0}
    model:  {teacher: {train_from_scratch: {hidden_size: 128, num_hidden_layers: 4}}}
    stages:
      data:    {seq_len: 64}
      teacher: {max_steps: 600}

Sections: `run` (RunConfig below), `model` (stages.context.ModelConfig, shared by the stages
that build models) and `stages.<name>` (the `Config` class of module `stages/<name>.py`). A stage
left out of `stages` is not run; a stage listed with no settings (`teacher:`) runs with its
defaults. Stages always run in pipeline order (STAGES below), whatever the order in the file.

Overrides from the command line (`stages.teacher.max_steps=50 run.seed=1`) are dotted paths;
values are parsed as YAML (`3e-3`, `true`, `[a, b]`) and then typed by the same schema as the file.
Every error names the file and the dotted path, all problems in one message:

    recipes/x.yaml: stages.teacher.max_steps: Input should be greater than 0

    from pipeline.recipe import load_recipe
    recipe = load_recipe("recipes/tiny.yaml", ["stages.teacher.max_steps=50"])
"""

from __future__ import annotations

import importlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

import stages
from pipeline import UserError
from stages.context import ModelConfig, StrictModel

# Stage name -> module, in pipeline order (the one list, stages.STAGES; tests swap this name).
STAGES: dict[str, str] = dict(stages.STAGES)


class RecipeError(UserError):
    """The recipe file or an override is wrong; the message names the file and the dotted path."""


class RunConfig(StrictModel):
    """The recipe's `run:` section: where the run lives and what seeds it."""

    name: str = Field("run", min_length=1, description="run name, used in logs and the default output_dir")
    output_dir: str | None = Field(
        None, description="run folder (relative to the current directory); None = runs/<name>"
    )
    seed: int = Field(0, ge=0, description="seed given to every stage (part of every stage fingerprint)")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="logging level of run.log and stderr")


@dataclass
class Recipe:
    """A validated recipe: the typed sections plus the stage modules it runs, in pipeline order."""

    path: Path
    run: RunConfig
    model: ModelConfig
    stages: dict[str, StrictModel]  # stage name -> its Config instance, pipeline order
    modules: dict[str, ModuleType]  # stage name -> its module (has Config and run)
    overrides: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir or Path("runs") / self.run.name)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in), as saved to run_dir/recipe.yaml."""
        return {
            "run": self.run.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
            "stages": {name: cfg.model_dump(mode="json") for name, cfg in self.stages.items()},
        }

    def to_yaml(self) -> str:
        header = f"# Resolved from {self.path}" + (f" with {' '.join(self.overrides)}" if self.overrides else "")
        return header + "\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file and path on any problem.

    Touches nothing on disk besides reading `path`.
    """
    path = Path(path)
    raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item, path)

    raw_stages = raw.get("stages")
    if raw_stages is None:
        raw_stages = {}
    if not isinstance(raw_stages, dict):
        raise RecipeError(f"{path}: stages: should be a mapping of stage name -> settings, got {raw_stages!r}")
    # `teacher:` with nothing after it means "run with defaults".
    raw["stages"] = {name: ({} if cfg is None else cfg) for name, cfg in raw_stages.items()}
    modules = _stage_modules(list(raw["stages"]), path)
    if not modules:
        raise RecipeError(f"{path}: stages: the recipe runs no stage (known stages: {', '.join(STAGES)})")

    schema = recipe_schema(modules)
    try:
        checked = schema.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, schema, path, overrides)) from None

    stages = {name: getattr(checked.stages, name) for name in modules}
    return Recipe(path, checked.run, checked.model, stages, modules, list(overrides))


def recipe_schema(modules: dict[str, ModuleType]) -> type[StrictModel]:
    """The pydantic model of a recipe running `modules` (stage name -> module with a Config)."""
    stage_fields = {
        name: (module.Config, Field(default_factory=module.Config, description=f"settings of stage '{name}'"))
        for name, module in modules.items()
    }
    Stages = create_model("Stages", __base__=StrictModel, **stage_fields)
    return create_model(
        "Recipe",
        __base__=StrictModel,
        run=(RunConfig, Field(default_factory=RunConfig, description="run name, folder and seed")),
        model=(ModelConfig, Field(default_factory=ModelConfig, description="models shared by the stages")),
        stages=(Stages, Field(default_factory=Stages, description="the stages to run, with their settings")),
    )


def load_stage(name: str) -> ModuleType:
    """Import the module of stage `name` (a RecipeError if it is unknown or not written yet)."""
    if name not in STAGES:
        raise RecipeError(f"unknown stage '{name}' (known stages: {', '.join(STAGES)})")
    module_name = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # the stage exists but one of its imports is missing: a real bug
            raise
        raise RecipeError(f"stage '{name}' is not implemented yet (no module {module_name})") from None
    for attr in ("Config", "run"):
        if not hasattr(module, attr):
            raise RecipeError(f"stage module {module_name} has no `{attr}` (a stage needs Config and run)")
    return module


def _stage_modules(names: list[str], path: Path) -> dict[str, ModuleType]:
    """Stage modules of the names in the recipe, in pipeline order."""
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise RecipeError(
            "\n".join(f"{path}: stages.{name}: unknown stage (known stages: {', '.join(STAGES)})" for name in unknown)
        )
    modules = {}
    for name in STAGES:
        if name in names:
            try:
                modules[name] = load_stage(name)
            except RecipeError as err:
                raise RecipeError(f"{path}: stages.{name}: {err}") from None
    return modules


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently: a recipe would run with a setting its author did not see)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # merge keys (<<) first: overriding a merged key is allowed
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.1 (PyYAML) reads `1e-4` as a string (its floats need a dot: 1.0e-4); YAML 1.2, Python and
# every user mean a number. A string learning rate would reach TRL / the Trainer and fail there.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def _load_yaml_text(text: str) -> Any:
    """`yaml.safe_load` with the duplicate-key check and exponent floats (raises yaml.YAMLError)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """` at line 4, column 3: found the key 'data' twice (while reading a mapping)` from a YAML error."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    if problem is None:
        return f"{where}: {' '.join(str(err).split())}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def _read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file as a dict; any problem reading it (missing, unreadable, not UTF-8, not YAML,
    a key twice, not a mapping) is a RecipeError naming the file, with the line where YAML says."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}, offset {err.start}); "
            "save the recipe as UTF-8"
        ) from None
    try:
        raw = _load_yaml_text(text)  # what yaml.safe_load does, with the duplicate-key check
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML{_yaml_problem(err)}") from None
    if raw is None:
        raise RecipeError(f"{path}: the recipe is empty (it needs at least a `stages:` section)")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with run / model / stages sections, got {type(raw).__name__}")
    non_text = [key for key in raw if not isinstance(key, str)]
    if non_text:
        raise RecipeError(f"{path}: top-level key {non_text[0]!r} is not a name (expected run, model, stages)")
    return raw


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> None:
    """Set `a.b.c=value` in the raw recipe dict; the schema checks the path and type afterwards."""
    key, sep, text = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise RecipeError(f"override '{item}': expected dotted.path=value, e.g. stages.teacher.max_steps=50")
    try:
        value = _load_yaml_text(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override '{item}': the value is not valid YAML: {err}") from None
    if keys[0] == "stages" and len(keys) > 2 and keys[1] not in (raw.get("stages") or {}):
        # A typo in an override must not silently switch on a stage the recipe does not run.
        raise RecipeError(
            f"override '{item}': stage '{keys[1]}' is not in {path} "
            f"(it runs: {', '.join(raw.get('stages') or {}) or 'nothing'}); add its section to the file"
        )
    node = raw
    for depth, name in enumerate(keys[:-1]):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override '{item}': {'.'.join(keys[: depth + 1])} is a value ({child!r}), not a section")
        node = child
    node[keys[-1]] = value


def _format_errors(
    err: ValidationError, schema: type[StrictModel], path: Path, overrides: list[str] | tuple[str, ...]
) -> str:
    """One line per problem: `file: dotted.path: message`, noting values set on the command line."""
    override_keys = {item.partition("=")[0].strip() for item in overrides}
    lines = []
    for error in err.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _allowed_keys_hint(schema, error["loc"][:-1])
        line = f"{path}: {loc}: {message}"
        if loc in override_keys:
            line += f" (set on the command line: {loc}={error.get('input')!r})"
        lines.append(line)
    return "\n".join(lines)


def _allowed_keys_hint(schema: type[BaseModel], loc: tuple) -> str:
    """` (allowed: a, b, c)` for the section at `loc`, found by walking the schema's field types."""
    model: Any = schema
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        candidates = [annotation, *typing.get_args(annotation)]  # `X | None` -> X
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return ""
    return f" (allowed: {', '.join(model.model_fields)})"
