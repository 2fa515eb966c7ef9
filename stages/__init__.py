"""The pipeline's stages, one module each, in order: data, teacher, distill, sparsify, rl, eval.

A stage module has `class Config(StrictModel)` (its `stages.<name>:` recipe section) and
`def run(cfg: Config, ctx: StageContext) -> dict` (metrics); see stages/context.py. No stage
imports another (rl uses its own ppo.py, eval its report.py); what several share lives in:

    context.py   what a stage receives (StageContext), the `model:` section, checkpoint discovery
    training.py  the HF-Trainer toolkit: knobs and arguments, collate, callbacks, train_or_load,
                 the frozen teacher, the SGC schedule, the teacher-student Trainer base, ZeRO-3 off
    tasks.py     task metrics: exact-match accuracy, perplexity, student beside teacher

`STAGES` below is the one list of stages (the runner's registry is this dict).
"""

# Stage name -> module, in pipeline order. Adding a stage is one line here plus its file.
STAGES: dict[str, str] = {
    "data": "stages.data",
    "teacher": "stages.teacher",
    "distill": "stages.distill",
    "sparsify": "stages.sparsify",
    "rl": "stages.rl",
    "eval": "stages.evaluate",
}
# The stages whose output folder holds a model (what eval measures and the report lists), in order.
MODEL_STAGES: tuple[str, ...] = ("teacher", "distill", "sparsify", "rl")
