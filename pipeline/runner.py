"""The runner: which stages run, which are skipped, and how an interrupted run resumes.

    spikerl run recipes/tiny.yaml                  # python -m pipeline run recipes/tiny.yaml
    from pipeline.recipe import load_recipe; from pipeline.runner import run_recipe
    run_recipe(load_recipe("recipes/tiny.yaml"), from_stage="teacher")

For each stage of the recipe, in pipeline order (data -> teacher -> distill -> sparsify -> rl -> eval):

* done         run_dir/<stage>/manifest.json exists, its fingerprint equals the one the recipe
               gives now, and the upstream outputs it was built from are still the current ones
               -> skipped ("skipped (done)").
* stale        a manifest exists but the stage's config, code, the `model` section, the seed or
               anything upstream changed -> the manifest is deleted, the folder wiped, the stage
               re-runs from scratch, and so does every stage after it.
* interrupted  the folder exists without a manifest (the run was killed or crashed) -> the
               stage runs again in the same folder and resumes from its newest checkpoint
               (`ctx.last_checkpoint()`), but only if `attempt.json` says the checkpoints were
               made with the same fingerprint; otherwise the folder is wiped first, so a
               checkpoint of another config is never resumed.
* pending      no folder yet -> runs.

`--from S` forces S and everything after it (from scratch: an interrupted attempt of S is wiped,
not resumed); `--until S` stops after S; `--only S` runs S alone and refuses unless every stage
before it is done. The whole recipe is validated (by `load_recipe`) before the run folder is
touched, and the run folder is locked (`.lock`) while a run writes it.

Preflight, also before the run folder is touched (`preflight`): each stage about to run is asked
for its own cheap checks (`def preflight(cfg, ctx)` in its module, optional: input files,
columns, tokenizer / teacher vocabulary); the outputs of finished stages that it will read are
checked against their manifests (sizes, safetensors headers), and so is the checkpoint an
interrupted stage would resume from. A problem is a UserError naming the file or field, and the
run folder stays as it was.

A model stage (teacher, distill, sparsify, rl) gets a model card, `README.md` with HF model-card
metadata (pipeline/model_card.py), written from the metrics the manifest will record, and with
`push_to_hub: {repo_id, private}` its folder is uploaded to the hub; both before the manifest, so a
failed push leaves the stage not done (the same command retries it).

Every stage also gets `StopOnNonFiniteLoss` (stages/training.py) in `ctx.extra["callbacks"]`: a
Trainer whose loss turns nan stops at that step, before the optimizer step, keeping the last
good checkpoint.

Distributed (`accelerate launch` / `torchrun`): every rank runs every stage function (training
stages need all ranks); rank 0 alone takes the lock, decides the plan and sends it to the others,
writes attempt.json / manifests / recipe.yaml / run.log; all ranks meet at a barrier before and
after each stage.
"""

from __future__ import annotations

import enum
import logging
import resource
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline import UserError
from pipeline.manifest import (
    ATTEMPT,
    RunLock,
    changed_code,
    check_output_file,
    code_version,
    fingerprint,
    git_commit,
    list_outputs,
    now,
    read_json,
    read_manifest,
    versions,
    write_json_atomic,
    write_manifest,
)
import pipeline.recipe
from pipeline.recipe import Recipe
from stages.context import StageContext, check_local_paths

log = logging.getLogger("spikerl")


# --------------------------------------------------------------------------------------------
# Where each stage stands (read-only: used by `run` to plan and by `status` to report)


class Status(str, enum.Enum):
    """Where a stage of the recipe stands on disk (the `state` column of `spikerl status`)."""

    DONE = "done"  # manifest with today's fingerprint, built from today's upstream outputs
    STALE = "stale"  # manifest, but the config, code, model section, seed or upstream changed
    INTERRUPTED = "interrupted"  # folder without a manifest: an attempt was killed or failed
    PENDING = "pending"  # no folder yet
    NOT_IN_RECIPE = "not in recipe"

    def __str__(self) -> str:
        return self.value


@dataclass
class StageState:
    name: str
    state: Status
    fingerprint: str | None  # what the recipe asks for now (None: stage not in the recipe)
    manifest: dict[str, Any] | None  # what is on disk
    why: str = ""  # for stale / interrupted: what changed, in words
    resumable: bool = False  # interrupted, and its checkpoints were made with today's inputs

    @property
    def fingerprint_matches(self) -> bool | None:
        if self.manifest is None or self.fingerprint is None:
            return None
        return self.manifest.get("fingerprint") == self.fingerprint


def expected_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Fingerprint of every stage of the recipe, computed from the recipe and code alone."""
    fingerprints: dict[str, str] = {}
    for name, cfg in recipe.stages.items():
        fingerprints[name] = fingerprint(
            stage=name,
            config=cfg.model_dump(mode="json"),
            upstream=dict(fingerprints),  # every earlier stage of the recipe
            model=recipe.model.model_dump(mode="json"),
            seed=recipe.run.seed,
            code=code_version(recipe.modules[name]),
        )
    return fingerprints


def inspect_run(recipe: Recipe) -> dict[str, StageState]:
    """State of every known stage in the recipe's run folder; reads files, writes nothing."""
    fingerprints = expected_fingerprints(recipe)
    states: dict[str, StageState] = {}
    current_outputs: dict[str, str | None] = {}  # output_id of each done upstream stage
    for name in pipeline.recipe.STAGES:  # looked up at call time: tests swap the registry
        stage_dir = recipe.run_dir / name
        manifest = read_manifest(stage_dir)
        if name not in recipe.stages:
            states[name] = StageState(name, Status.NOT_IN_RECIPE, None, manifest)
            continue
        state = StageState(name, Status.PENDING, fingerprints[name], manifest)
        if manifest is not None:
            if manifest.get("fingerprint") != fingerprints[name]:
                state.state, state.why = Status.STALE, _what_changed(manifest, recipe, name, fingerprints)
            elif manifest.get("upstream_outputs") != current_outputs:
                state.state, state.why = Status.STALE, "an upstream stage re-ran since"
            else:
                state.state = Status.DONE
        elif stage_dir.is_dir():
            state.state = Status.INTERRUPTED
            state.resumable = read_json(stage_dir / ATTEMPT) == {
                "fingerprint": fingerprints[name], "upstream_outputs": dict(current_outputs)
            }
            state.why = "no manifest; " + ("resumes" if state.resumable else "made with other inputs: restarts clean")
        current_outputs[name] = manifest.get("output_id") if state.state is Status.DONE else None
        states[name] = state
    return states


def _what_changed(manifest: dict[str, Any], recipe: Recipe, name: str, fingerprints: dict[str, str]) -> str:
    """Why a manifest's fingerprint differs, in words: every reason, most specific first
    ("stages.teacher changed: max_steps 30 -> 20; the code changed: spiking/neurons.py")."""
    reasons = []
    config = recipe.stages[name].model_dump(mode="json")
    old = manifest.get("config") or {}
    changed = [f"{key} {old.get(key)!r} -> {config.get(key)!r}" for key in config if old.get(key) != config.get(key)]
    if changed:
        reasons.append(f"stages.{name} changed: " + ", ".join(changed))
    files = changed_code(manifest.get("code_version"), code_version(recipe.modules[name]))
    if files:
        reasons.append("the code changed: " + ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else ""))
    if manifest.get("model") != recipe.model.model_dump(mode="json"):
        reasons.append("the model section changed")
    if manifest.get("seed") != recipe.run.seed:
        reasons.append(f"run.seed changed ({manifest.get('seed')} -> {recipe.run.seed})")
    names = list(fingerprints)
    expected_upstream = {up: fingerprints[up] for up in names[: names.index(name)]}
    old_upstream = manifest.get("upstream") or {}
    upstream = [up for up in {**old_upstream, **expected_upstream} if old_upstream.get(up) != expected_upstream.get(up)]
    if upstream:
        reasons.append("upstream changed: " + ", ".join(upstream))
    return "; ".join(reasons) or "fingerprint differs"


# --------------------------------------------------------------------------------------------
# The plan: what this invocation does to each stage


@dataclass
class Step:
    name: str
    run: bool
    reason: str  # "done", "forced by --from teacher", "stale: ...", ...
    fresh: bool = False  # forced by --from: start from scratch even if an interrupted attempt could resume


def make_plan(
    recipe: Recipe,
    states: dict[str, StageState],
    from_stage: str | None = None,
    only: str | None = None,
    until: str | None = None,
) -> list[Step]:
    """Decide, before anything runs, which stages run and why. Raises UserError for --only with
    an unfinished upstream."""
    names = list(recipe.stages)
    if only is not None:
        unfinished = [f"{n} ({states[n].state})" for n in names[: names.index(only)] if states[n].state is not Status.DONE]
        if unfinished:
            raise UserError(
                f"--only {only}: the stages before it must be done and up to date, but these are not: "
                f"{', '.join(unfinished)}; run them first (spikerl run {recipe.path} --until "
                f"{names[names.index(only) - 1]})"
            )
        return [Step(only, True, f"--only {only}")]

    first_forced = names.index(from_stage) if from_stage else len(names)
    last = names.index(until) if until else len(names) - 1
    plan, upstream_runs = [], False
    for i, name in enumerate(names[: last + 1]):
        state = states[name]
        if i >= first_forced:
            step = Step(name, True, f"forced by --from {from_stage}", fresh=True)
        elif upstream_runs:
            step = Step(name, True, "an upstream stage re-runs")
        elif state.state is not Status.DONE:
            step = Step(name, True, state.state.value + (f": {state.why}" if state.why else ""))
        else:
            step = Step(name, False, "done")
        upstream_runs |= step.run
        plan.append(step)
    return plan


def check_selection(recipe: Recipe, from_stage: str | None, only: str | None, until: str | None) -> None:
    """--from / --only / --until name stages of this recipe, and --only goes alone."""
    if only and (from_stage or until):
        raise UserError("--only runs one stage; it cannot be combined with --from or --until")
    for flag, name in (("--from", from_stage), ("--only", only), ("--until", until)):
        if name is not None and name not in recipe.stages:
            raise UserError(f"{flag} {name}: not a stage of {recipe.path} (it runs: {', '.join(recipe.stages)})")
    if from_stage and until and list(recipe.stages).index(until) < list(recipe.stages).index(from_stage):
        raise UserError(f"--until {until} comes before --from {from_stage}: nothing to run")


# --------------------------------------------------------------------------------------------
# Running


def run_recipe(
    recipe: Recipe,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    until: str | None = None,
) -> dict[str, str]:
    """Run the recipe's stages as planned; returns {stage: "ran" | "skipped"}.

    A bad selection or a locked run folder raises UserError before anything is written.
    An exception inside a stage propagates (after logging how to resume) with the stage's folder
    left without manifest, so the next run resumes it.
    """
    check_selection(recipe, from_stage, only, until)
    dist = distributed_state()
    run_dir = recipe.run_dir
    lock = RunLock(run_dir)

    actions: dict[str, str] = {}
    with _logging(recipe.run.log_level, dist.is_main_process) as log_to_file:
        # Rank 0 decides; the others follow its plan (they must run the same stages to meet at barriers).
        plan, error = None, None
        if dist.is_main_process:
            try:
                states = inspect_run(recipe)
                preflight(recipe, states, make_plan(recipe, states, from_stage, only, until))  # refuse before writing anything
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                plan = make_plan(recipe, inspect_run(recipe), from_stage, only, until)  # again, under the lock
            except UserError as err:
                lock.release()  # no-op unless the second plan failed
                error = str(err)
        plan, error = _from_main_process([plan, error], dist)
        if error is not None:
            raise UserError(error)

        try:
            if dist.is_main_process:
                log_to_file(run_dir / "run.log")
                (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
            log.info(
                "run %s in %s (%d process%s): %s",
                recipe.run.name, run_dir, dist.num_processes, "es" if dist.num_processes > 1 else "",
                ", ".join(f"{s.name}={'run' if s.run else 'skip'}" for s in plan),
            )
            fingerprints = expected_fingerprints(recipe)
            for step in plan:
                if not step.run:
                    log.info("%s: skipped (%s)", step.name, step.reason)
                    actions[step.name] = "skipped"
                    continue
                log.info("%s: running (%s)", step.name, step.reason)
                _run_stage(recipe, step.name, fingerprints, fresh=step.fresh)
                actions[step.name] = "ran"
            log.info("run %s finished: %s", recipe.run.name, ", ".join(f"{k} {v}" for k, v in actions.items()))
        finally:
            lock.release()
    _close_process_group()
    return actions


def _close_process_group() -> None:
    """End torch.distributed after a run that every rank finished (launchers start one per run).

    Left to interpreter exit, the gloo / NCCL threads are torn down in no set order, and a rank
    can abort (`terminate called without an active exception`) after all its work is saved.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down while another still talks to it
        torch.distributed.destroy_process_group()


def _run_stage(recipe: Recipe, name: str, fingerprints: dict[str, str], fresh: bool = False) -> None:
    """Prepare the folder, run the stage on every rank, then (rank 0) write the manifest last."""
    dist = distributed_state()
    run_dir = recipe.run_dir
    stage_dir = run_dir / name
    names = list(recipe.stages)
    upstream = names[: names.index(name)]
    # The upstream manifests were all written before this point (earlier stages, barrier-separated).
    upstream_outputs = {up: (read_manifest(run_dir / up) or {}).get("output_id") for up in upstream}
    attempt = {"fingerprint": fingerprints[name], "upstream_outputs": upstream_outputs}

    dist.wait_for_everyone()
    if dist.is_main_process:
        _prepare_stage_dir(stage_dir, attempt, fresh)
    dist.wait_for_everyone()  # nobody reads the folder before rank 0 has wiped or kept it

    ctx = stage_context(recipe, name, dist)
    resume_from = ctx.last_checkpoint()
    if resume_from is not None:
        log.info("%s: resuming the interrupted attempt from %s", name, resume_from)

    started, start = now(), time.perf_counter()
    _reset_peak_rss()
    try:
        metrics = recipe.modules[name].run(recipe.stages[name], ctx) or {}
    except BaseException:
        log.error(
            "%s: failed after %.1f s; its folder keeps the checkpoints made so far: run the same "
            "command again to resume", name, time.perf_counter() - start,
        )
        raise
    finally:
        # a Trainer's DeepSpeed config is a transformers global: left live, ZeRO-3 would shard
        # every model the next stage loads, before that stage asks for it
        from stages.training import deepspeed_off

        deepspeed_off()
    wall_s = time.perf_counter() - start
    dist = distributed_state()  # the stage's Trainer may have rebuilt it
    dist.wait_for_everyone()  # every rank has finished writing outputs

    _card_and_push(recipe, name, fingerprints[name], metrics, dist)

    if dist.is_main_process:
        write_manifest(stage_dir, {  # LAST: its presence is what "done" means
            "stage": name,
            "fingerprint": fingerprints[name],
            "output_id": uuid.uuid4().hex,
            "config": recipe.stages[name].model_dump(mode="json"),
            "upstream": {up: fingerprints[up] for up in upstream},
            "upstream_outputs": upstream_outputs,
            "model": recipe.model.model_dump(mode="json"),
            "seed": recipe.run.seed,
            "code_version": code_version(recipe.modules[name]),
            "metrics": metrics,
            "outputs": list_outputs(stage_dir),
            "wall_s": round(wall_s, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1),  # rank 0's process; includes the runner itself
            "num_processes": dist.num_processes,
            "started": started,
            "finished": now(),
            "versions": versions(),
            "git_commit": git_commit(),
        })
    log.info("%s: done in %.1f s, peak RSS %.0f MB, metrics %s", name, wall_s, _peak_rss_mb(), _short(metrics))


def _card_and_push(recipe: Recipe, name: str, fingerprint: str, metrics: dict[str, Any], dist: Any) -> None:
    """A model stage's model card, then its `push_to_hub` (rank 0), both before the manifest: the
    card is an output like the weights (its size is recorded), and a failed push leaves the stage
    not done. The push's outcome goes to every rank, so all of them stop together."""
    from stages import MODEL_STAGES

    if name not in MODEL_STAGES:
        return
    from pipeline.model_card import PushError, push_folder, write_model_card  # imports transformers

    error = None
    if dist.is_main_process:
        write_model_card(recipe, name, fingerprint, metrics)
        repo = getattr(recipe.stages[name], "push_to_hub", None)
        if repo is not None:
            try:
                push_folder(recipe.run_dir / name, repo, f"stages.{name}.push_to_hub")
            except PushError as err:
                error = (f"{err}; the stage is not marked done: run the same command again to retry "
                         "(the stage resumes from its checkpoints)")
    [error] = _from_main_process([error], dist)
    if error is not None:
        raise UserError(error)


def _prepare_stage_dir(stage_dir: Path, attempt: dict[str, Any], fresh: bool = False) -> None:
    """Keep the folder only when it holds checkpoints of this very attempt (and the stage is not
    forced to start afresh); else start clean."""
    if read_manifest(stage_dir) is not None:
        # A finished (stale or forced) stage: its last checkpoint is the end of training, and
        # resuming from it would train nothing. Delete the manifest first, so a crash while
        # wiping never leaves a manifest over half-deleted outputs.
        (stage_dir / "manifest.json").unlink()
        log.info("%s: removing the previous outputs", stage_dir.name)
        shutil.rmtree(stage_dir)
    elif stage_dir.is_dir() and fresh:
        log.info("%s: forced: wiping the interrupted attempt in %s instead of resuming it", stage_dir.name, stage_dir)
        shutil.rmtree(stage_dir)
    elif stage_dir.is_dir() and read_json(stage_dir / ATTEMPT) != attempt:
        log.warning(
            "%s: the interrupted attempt in %s was made with another config or upstream; "
            "wiping it instead of resuming", stage_dir.name, stage_dir,
        )
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / ATTEMPT, attempt)


# --------------------------------------------------------------------------------------------
# Preflight: every check that needs no training, before the run folder is touched


def preflight(recipe: Recipe, states: dict[str, StageState], plan: list[Step]) -> None:
    """Refuse (UserError naming the file or field) what would fail later, before anything is written.

    * each stage that runs: its module's optional `preflight(cfg, ctx)` (input files, columns,
      tokenizer / teacher vocabulary ...), which raises ValueError / OSError;
    * each finished stage before the last one that runs (its outputs will be read): every file
      its manifest lists has the recorded size, and safetensors / torch.save files are whole;
    * each interrupted stage that will resume: the checkpoint it resumes from is whole.
    """
    names = list(recipe.stages)
    running = [step for step in plan if step.run]
    if not running:
        return
    last = names.index(running[-1].name)
    problems: list[str] = []
    for name in names[:last]:
        if states[name].state is Status.DONE and name not in {step.name for step in running}:
            problems += _damaged_outputs(recipe, name, states[name].manifest or {})

    upstream_runs = False
    for step in running:
        ctx = stage_context(recipe, step.name)
        check = getattr(recipe.modules[step.name], "preflight", None)
        if check is not None:
            try:
                check(recipe.stages[step.name], ctx)
            except (ValueError, OSError) as err:
                problems.append(f"{recipe.path}: {err}")
        problems += [f"{recipe.path}: {problem}" for problem in check_local_paths(recipe.stages[step.name], f"stages.{step.name}")]
        push = getattr(recipe.stages[step.name], "push_to_hub", None)
        if push is not None:
            from pipeline.model_card import push_problems

            problems += [f"{recipe.path}: {problem}" for problem in push_problems(push, f"stages.{step.name}.push_to_hub")]
        resumes = states[step.name].resumable and not step.fresh and not upstream_runs
        if resumes:
            problems += _damaged_checkpoint(recipe, step.name, ctx)
        upstream_runs = True
    if problems:
        raise UserError("\n".join(problems))


def stage_context(recipe: Recipe, name: str, dist: Any = None) -> StageContext:
    """The context stage `name` gets: its folder, the upstream folders, the model section, the seed.

    With `dist` (the running process's distributed state) it is the context the stage runs with:
    rank, world size and the guard callbacks; without, the one preflight checks (folders may not
    exist yet).
    """
    names = list(recipe.stages)
    extra: dict[str, Any] = {}
    if dist is not None:
        extra = {"process_index": dist.process_index, "num_processes": dist.num_processes, "callbacks": _guard_callbacks(name)}
    return StageContext(
        stage=name,
        run_dir=recipe.run_dir,
        out_dir=recipe.run_dir / name,
        upstream={up: recipe.run_dir / up for up in names[: names.index(name)]},
        model=recipe.model,
        seed=recipe.run.seed,
        is_main_process=True if dist is None else dist.is_main_process,
        logger=logging.getLogger(f"spikerl.{name}"),
        extra=extra,
    )


def _damaged_outputs(recipe: Recipe, name: str, manifest: dict[str, Any]) -> list[str]:
    """A finished stage's outputs, checked against the sizes its manifest recorded."""
    problems = []
    for rel, size in (manifest.get("outputs") or {}).items():
        path = recipe.run_dir / name / rel
        problem = check_output_file(path, size if isinstance(size, int) else None)
        if problem is not None:
            problems.append(
                f"{path} {problem}: the output of the finished stage '{name}' is damaged; "
                f"re-run with `spikerl run {recipe.path} --from {name}`"
            )
    return problems


def _damaged_checkpoint(recipe: Recipe, name: str, ctx: StageContext) -> list[str]:
    """The checkpoint an interrupted stage would resume from: every weight / state file whole."""
    checkpoint = ctx.last_checkpoint()
    if checkpoint is None:
        return []
    problems = []
    for path in sorted(checkpoint.iterdir()):
        problem = check_output_file(path) if path.is_file() else None
        if problem is not None:
            problems.append(
                f"{path} {problem}: the checkpoint stage '{name}' would resume from is damaged; "
                f"re-run with `spikerl run {recipe.path} --from {name}` to restart the stage, or delete "
                f"{checkpoint} to resume from the checkpoint before it"
            )
    return problems


def _guard_callbacks(name: str) -> list[Any]:
    """TrainerCallbacks every stage's trainer gets (stages pass ctx.extra["callbacks"] on)."""
    from stages.training import StopOnNonFiniteLoss  # imports transformers: only when a stage runs

    return [StopOnNonFiniteLoss(name)]


# --------------------------------------------------------------------------------------------
# Helpers: distributed broadcast, logging, memory


def distributed_state() -> Any:
    """accelerate's PartialState: rank, world size, barriers. Under torchrun / accelerate launch it
    initialises torch.distributed from their environment variables.

    Without CUDA it is asked for the CPU (gloo) backend: otherwise a plain `torchrun
    --nproc_per_node 2` on a CPU machine is not recognised as distributed at all. Fetched again at
    each use: HF Trainer resets and rebuilds the shared state when it creates its arguments.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _from_main_process(objects: list[Any], dist: Any) -> list[Any]:
    """Rank 0's `objects` on every rank (a no-op in a single process)."""
    if dist.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(objects, from_process=0)
    return objects


@contextmanager
def _logging(level: str, is_main_process: bool) -> Iterator[Callable[[Path], None]]:
    """`spikerl` loggers to stderr (other ranks: warnings only); yields `log_to_file(path)`, which
    rank 0 calls once it holds the lock, to also write run_dir/run.log."""
    logger = logging.getLogger("spikerl")
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []

    def add(handler: logging.Handler) -> None:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        handlers.append(handler)

    add(logging.StreamHandler(sys.stderr))
    old_level = logger.level
    logger.setLevel(level.upper() if is_main_process else logging.WARNING)
    try:
        yield lambda path: add(logging.FileHandler(path))
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)


def _reset_peak_rss() -> None:
    """Start a fresh peak-RSS window for this stage (Linux: `5 > /proc/self/clear_refs`).

    First the memory the previous stage freed is handed back to the system (`gc.collect`, then
    glibc's `malloc_trim`): glibc keeps freed heap memory mapped, so without it a stage's "peak"
    would start from the previous stage's leftovers.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may include freed memory
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then covers the process so far
        pass


def _peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def _short(metrics: dict[str, Any], n: int = 4) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:n]]
    return ", ".join(items) + (" ..." if len(metrics) > n else "") if items else "{}"
