"""The command line: `spikerl run | status | report` (the same as `python -m pipeline ...`).

    spikerl run recipes/tiny.yaml
    spikerl run recipes/tiny.yaml stages.teacher.max_steps=50 run.seed=1 --from teacher
    spikerl status recipes/tiny.yaml
    spikerl report runs/tiny

Mistakes the user can fix (bad recipe, missing file, locked run folder) print one message and
exit with status 2; a failure inside a stage prints its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from pipeline import UserError

EXAMPLES = """\
examples:
  spikerl run recipes/tiny.yaml                          all stages; finished ones are skipped,
                                                         interrupted ones resume
  spikerl run recipes/tiny.yaml stages.teacher.lr=1e-3   override a recipe value (dotted path)
  spikerl run recipes/tiny.yaml --from teacher           force teacher and everything after it
  spikerl run recipes/tiny.yaml --only teacher           only teacher (data must be done)
  spikerl run recipes/tiny.yaml --until data             stop after data
  spikerl status recipes/tiny.yaml                       what is done, stale, interrupted
  spikerl report runs/tiny                               accuracy / energy report of a run
  torchrun --nproc_per_node 2 -m pipeline run recipes/tiny.yaml
  accelerate launch --config_file recipes/accelerate/zero2.yaml -m pipeline run recipes/tiny.yaml
                                                         distributed: every rank runs each stage,
                                                         rank 0 writes the manifests
"""

OVERRIDE_HELP = (
    "recipe overrides as dotted.path=value (value parsed as YAML, checked like the file), "
    "e.g. stages.teacher.max_steps=50 run.seed=1 model.teacher.pretrained=state-spaces/mamba-130m-hf"
)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikerl",
        description=_wrap("Staged pipeline: distil a Mamba LM into a spiking Mamba and fine-tune it with RL. "
        "Stages run in order data -> teacher -> distill -> sparsify -> rl -> eval; each writes "
        "RUN_DIR/<stage>/ and, when finished, RUN_DIR/<stage>/manifest.json."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a recipe's stages (skips finished ones, resumes interrupted ones)",
        description=_wrap("Run the stages of RECIPE in order. A stage whose manifest matches the recipe "
        "(same config, code, model section, seed and upstream) is skipped; a stage whose inputs "
        "changed re-runs with everything after it; a stage interrupted earlier resumes from its "
        "newest checkpoint. The whole recipe is checked before the run folder is touched."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", metavar="RECIPE", help="recipe YAML file, e.g. recipes/tiny.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    run.add_argument("--from", dest="from_stage", metavar="STAGE",
                     help="force STAGE and every stage after it to re-run, even if finished")
    run.add_argument("--only", metavar="STAGE",
                     help="run only STAGE (re-runs it if finished); the stages before it must be done")
    run.add_argument("--until", metavar="STAGE", help="stop after STAGE (may follow --from)")

    status = commands.add_parser(
        "status",
        help="show each stage's state for a recipe: done / stale / interrupted / pending",
        description=_wrap("Print a table of the stages of RECIPE's run folder: state (done, stale = "
        "finished with other inputs, interrupted = folder without manifest, pending, not in "
        "recipe), whether the manifest's fingerprint matches the recipe, wall time and key "
        "metrics. Reads only; writes nothing."),
        epilog="example:\n  spikerl status recipes/tiny.yaml stages.teacher.max_steps=50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    status.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)

    report = commands.add_parser(
        "report",
        help="write the accuracy / energy report of a finished run: markdown, JSON, PNG plots",
        description=_wrap("Build the report of RUN_DIR from its files alone: every stage side by side "
        "(accuracy, perplexity, firing rate, energy pJ/token, energy ratio, parameters), the papers' "
        "reference figures beside ours, and PNG plots (matplotlib). Needs RUN_DIR/eval/metrics.json, "
        "written by the eval stage (which also writes this report at its end)."),
        epilog="examples:\n  spikerl report runs/tiny                 writes runs/tiny/eval/report/report.md\n"
        "  spikerl report runs/tiny --out /tmp/rep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="run folder, e.g. runs/tiny")
    report.add_argument("--out", metavar="DIR", help="where to write the report (default RUN_DIR/eval/report)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    # parse_known_args so overrides may also follow the options (`run R --from teacher a.b=1`).
    args, rest = parser.parse_known_args(argv)
    if args.command == "report":
        if rest:
            parser.error(f"unrecognized argument: {rest[0]} (report takes RUN_DIR and --out DIR)")
        return args
    for item in rest:
        if item.startswith("-") or "=" not in item:
            parser.error(f"unrecognized argument: {item}")
        args.overrides.append(item)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"'{item}' is not KEY=VALUE (e.g. stages.teacher.max_steps=50)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "report":
            from stages.report import build_report  # reads files only; no recipe needed

            try:
                folder = build_report(args.run_dir, args.out)
            except (FileNotFoundError, ValueError) as err:
                raise UserError(str(err)) from None
            print(f"report: {folder / 'report.md'}")
            return 0
        # Imported here so `spikerl --help` stays fast (the stages import torch / transformers).
        from pipeline.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "run":
            from pipeline.runner import run_recipe

            run_recipe(recipe, from_stage=args.from_stage, only=args.only, until=args.until)
        elif args.command == "status":
            print(status_table(recipe))
    except UserError as err:
        print(f"spikerl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spikerl: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def status_table(recipe) -> str:
    """The `spikerl status` table (reads the run folder, writes nothing)."""
    from pipeline.manifest import LOCK, RunLock, read_json
    from pipeline.runner import inspect_run

    rows = [("stage", "state", "fingerprint", "wall", "metrics", "note")]
    for state in inspect_run(recipe).values():
        manifest = state.manifest or {}
        match = {True: "match", False: "differs", None: "-"}[state.fingerprint_matches]
        wall = f"{manifest['wall_s']:.1f} s" if isinstance(manifest.get("wall_s"), (int, float)) else "-"
        rows.append((state.name, state.state, match, wall, _key_metrics(manifest.get("metrics") or {}), state.why))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"recipe {recipe.path}, run folder {recipe.run_dir}"]
    lock = read_json(recipe.run_dir / LOCK)
    if lock:
        stale = RunLock._is_stale(lock)
        lines[0] += f" ({'stale lock of dead' if stale else 'locked by'} pid {lock.get('pid')} on {lock.get('host')})"
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _key_metrics(metrics: dict, n: int = 3) -> str:
    numbers = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers[:n]]
    return " ".join(cells) or "-"


if __name__ == "__main__":
    sys.exit(main())
