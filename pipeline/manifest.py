"""Stage manifests, fingerprints, atomic writes and the run lock.

A stage is finished exactly when `run_dir/<stage>/manifest.json` exists: the runner writes it
LAST, after the stage returned, to a temporary name that is fsynced and then renamed over the
final name (`os.replace` is atomic), so a crash at any moment leaves either no manifest or a
complete one.

    {stage, fingerprint, output_id, config, upstream: {name: fingerprint},
     upstream_outputs: {name: output_id}, metrics, outputs: {path: bytes}, wall_s, peak_rss_mb,
     started, finished, versions: {torch, transformers, ...}, git_commit}

`fingerprint` = sha256 of (stage config, upstream fingerprints, the recipe's `model` section and
`run.seed`, the code the stage runs). The code is every project module the stage imports,
transitively, within pipeline/, stages/, spiking/ and rewards/ (`code_files`): each file's bytes
are hashed, so any edit to one of them, a comment too, makes the stage and every stage after it
stale. Same fingerprint = same inputs = nothing to redo. The manifest keeps the per-file hashes
(`code`), so `spikerl status` can say which file changed.
`output_id` is fresh for every attempt: a downstream manifest records the `output_id`s it was
built from, so re-running an upstream stage (`--only teacher`) makes everything after it stale
even though no config changed.

The run lock `run_dir/.lock` (created with O_CREAT|O_EXCL, holds {pid, host}) keeps two runs from
writing the same folder; a lock left by a dead process on this host is taken over with a warning.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import time
import zipfile
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline import UserError

MANIFEST = "manifest.json"
ATTEMPT = "attempt.json"  # {fingerprint, upstream_outputs} of the attempt that owns the folder's checkpoints
LOCK = ".lock"
TRACKED_PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft")

log = logging.getLogger("spikerl")


# --------------------------------------------------------------------------------------------
# Fingerprints


PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "stages", "spiking", "rewards")  # the code whose edits re-run stages


def _module_file(name: str) -> Path | None:
    """The source file of project module `name` (`spiking.neurons` -> spiking/neurons.py), or None."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path, package: str) -> set[str]:
    """Module names `path` imports anywhere (function bodies too: lazy imports run as well).

    `from a.b import c` yields a.b and a.b.c (c may be a submodule); relative imports are resolved
    against `package`; importing a.b.c also runs a and a.b, so they count too.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def code_files(module: ModuleType) -> list[Path]:
    """The stage module's file and every project file it imports, transitively (sorted)."""
    start = Path(module.__file__).resolve()
    seen: dict[Path, str] = {}
    todo = [(start, module.__name__ if start.name != "__init__.py" else module.__name__ + ".__init__")]
    while todo:
        path, name = todo.pop()
        if path in seen:
            continue
        seen[path] = name
        package = name.rpartition(".")[0] if path.name != "__init__.py" else name.removesuffix(".__init__")
        for imported in _imported_modules(path, package):
            found = _module_file(imported)
            if found is not None and found not in seen:
                todo.append((found, imported if found.name != "__init__.py" else imported + ".__init__"))
    # a module's native source beside it (spiking/cpu_kernels.py builds cpu_kernels.cpp) runs too
    native = [path.with_suffix(".cpp") for path in seen if path.with_suffix(".cpp").is_file()]
    return sorted([*seen, *native])


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:  # a stage module outside the project (tests' stand-in stages)
        return path.name


def code_version(module: ModuleType) -> dict[str, str]:
    """{project-relative path: sha256 of its bytes} of the code the stage runs (`code_files`)."""
    return {_relative(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in code_files(module)}


def changed_code(old: dict[str, str] | str | None, new: dict[str, str]) -> list[str]:
    """The files whose hash differs between two `code_version`s (added and removed files too)."""
    if not isinstance(old, dict):  # a manifest from before per-file hashes: say the stage file
        return sorted(new)
    return sorted(path for path in {*old, *new} if old.get(path) != new.get(path))


def fingerprint(
    stage: str,
    config: dict[str, Any],
    upstream: dict[str, str],
    model: dict[str, Any],
    seed: int,
    code: dict[str, str],
) -> str:
    """sha256 of everything that decides a stage's outputs (canonical JSON, keys sorted)."""
    payload = {"stage": stage, "config": config, "upstream": upstream, "model": model, "seed": seed, "code": code}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic JSON files


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` so that readers see the old file, or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the rename did not happen: leave no debris
            tmp.unlink()
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None if missing or unreadable (warned: treated as absent)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable %s (%s)", path, err)
        return None
    return data if isinstance(data, dict) else None


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    return read_json(stage_dir / MANIFEST)


def write_manifest(stage_dir: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(stage_dir / MANIFEST, manifest)


# --------------------------------------------------------------------------------------------
# What a manifest records about the environment and the outputs


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide a stage's numbers, and Python's."""
    found: dict[str, str | None] = {}
    for package in TRACKED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = platform.python_version()
    return found


def git_commit(folder: Path | None = None) -> str | None:
    """The project's commit (with `-dirty` if files changed), or None outside a git checkout."""
    folder = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def list_outputs(stage_dir: Path) -> dict[str, int]:
    """Files a stage left in its folder (relative path -> bytes), without checkpoints and our own files."""
    outputs = {}
    for path in sorted(stage_dir.rglob("*")):
        rel = path.relative_to(stage_dir)
        ours = rel.name in (MANIFEST, ATTEMPT) or (rel.name.startswith(".") and ".tmp-" in rel.name)
        if not path.is_file() or rel.parts[0] == "checkpoints" or ours:
            continue
        outputs[str(rel)] = path.stat().st_size
    return outputs


def check_output_file(path: Path, expected_bytes: int | None = None) -> str | None:
    """What is wrong with a saved file, in words, or None if it looks whole.

    Cheap checks that catch a truncated or overwritten file without reading it all: the size the
    manifest recorded, the safetensors header (its tensors must end exactly at the end of the
    file) and, for torch.save files (.pt / .pth / .bin: zip archives), the zip directory at the end.
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if expected_bytes is not None and size != expected_bytes:
        return f"has {size} bytes, but {expected_bytes} were written"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if path.suffix in (".pt", ".pth", ".bin") and size > 0 and not zipfile.is_zipfile(path):
        return "is not a complete torch.save archive (truncated?)"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes, not even a safetensors header)"
            header_len = int.from_bytes(head, "little")
            if header_len > size - 8:
                return f"is truncated ({size} bytes, its header alone says {header_len + 8})"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as err:
        return f"has an unreadable safetensors header ({err})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"is truncated or padded ({size} bytes, its header says {expected})"
    return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------
# Run lock


class LockHeldError(UserError):
    """Another live process is running in the same run folder."""


class RunLock:
    """`run_dir/.lock`: one run per folder. Use as a context manager.

    The file is created with O_CREAT|O_EXCL, so of two processes racing for it exactly one wins.
    A lock whose pid is dead on this host (the run was killed) is taken over with a warning; a lock
    from another host cannot be checked and is always refused.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):  # the second try follows removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json(self.path) or {}
                if not self._is_stale(holder):
                    raise LockHeldError(
                        f"run folder {self.path.parent} is in use by pid {holder.get('pid', '?')} on host "
                        f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to finish, "
                        f"or delete {self.path} if that process is gone"
                    ) from None
                log.warning(
                    "taking over the stale lock %s of pid %s (no longer running on %s)",
                    self.path, holder.get("pid"), holder.get("host"),
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": now()}, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise LockHeldError(f"could not take the run lock {self.path}: another process took it first")

    def release(self) -> None:
        if self.held:
            holder = read_json(self.path) or {}
            if holder.get("pid") == os.getpid():  # never delete a lock someone else took over
                self.path.unlink(missing_ok=True)
            self.held = False

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        """A lock is stale when it names a pid on this host that no longer exists."""
        pid = holder.get("pid")
        if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
            return False  # unreadable (maybe being written right now) or another machine: refuse
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)  # signal 0: existence check only
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by another user
            return False
        return False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
