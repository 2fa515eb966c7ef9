"""The pipeline's stages, one module each, in order: data, teacher, distill, sparsify, rl, evaluate.

A stage module has `class Config(StrictModel)` (its `stages.<name>:` recipe section) and
`def run(cfg: Config, ctx: StageContext) -> dict` (metrics); see stages/context.py. `tasks.py`
holds the task metrics (exact-match accuracy, perplexity) the stages share.
"""
