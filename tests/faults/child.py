"""The spikerl CLI with one fault installed: the process SIGKILLs itself in the middle of a write.

    python tests/faults/child.py FAULT run RECIPE [...]

FAULT is one of
    manifest:<stage>          after the manifest's temp file is written and fsynced, before the
                              rename that publishes it (pipeline.manifest.write_json_atomic)
    safetensors:<path-suffix> while writing the safetensors file whose path ends with the suffix
                              (e.g. teacher/checkpoints/checkpoint-20/model.safetensors): half of
                              its bytes are on disk, then the kill

Only the test suite uses this; the production code has no fault hooks.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, _, target = fault.partition(":")
    if kind == "manifest":
        import pipeline.manifest

        real_replace = os.replace

        def replace(src, dst):
            dst = Path(dst)
            if dst.name == "manifest.json" and dst.parent.name == target:
                die()
            real_replace(src, dst)

        pipeline.manifest.os = _OsProxy(replace)  # only pipeline.manifest sees the fault
    elif kind == "safetensors":
        import transformers.modeling_utils as modeling_utils

        real_save = modeling_utils.safe_save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            if str(filename).endswith(target):
                size = Path(filename).stat().st_size
                os.truncate(filename, size // 2)  # a torn write: the first half made it to disk
                die()

        modeling_utils.safe_save_file = save_file
    else:
        raise SystemExit(f"unknown fault {fault!r}")


class _OsProxy:
    """`os` with `replace` swapped (pipeline.manifest calls os.replace / os.open / os.fsync ...)."""

    def __init__(self, replace):
        self.replace = replace

    def __getattr__(self, name):
        return getattr(os, name)


if __name__ == "__main__":
    install(sys.argv[1])
    from pipeline.__main__ import main

    sys.exit(main(sys.argv[2:]))
