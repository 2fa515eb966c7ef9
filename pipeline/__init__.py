"""spikerl's staged runner: recipe schema, stage manifests, skip / resume logic, CLI.

Nothing here is model-specific; the stages live in `stages/`, the model in `spiking/`.

    spikerl run recipes/tiny.yaml            # or: python -m pipeline run recipes/tiny.yaml
    spikerl status recipes/tiny.yaml

Modules, in the order a reader needs them:
    recipe.py    the typed recipe (`run`, `model`, `stages.<name>`), YAML + `key=value` overrides
    manifest.py  run_dir/<stage>/manifest.json, fingerprints, atomic writes, the run lock
    runner.py    stage order, skip / resume / force, distributed barriers
    model_card.py  the README.md model card of each model stage's folder, push_to_hub
    __main__.py  the command line
"""


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, run folder locked).

    The CLI prints its message alone, without a traceback, and exits with status 2.
    """
