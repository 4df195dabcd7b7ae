"""Checkpoints rollserve builds once per machine (converted GGUF files, random-weight presets)
and keeps in its cache directory.

Invariant: a cache entry is a directory holding a manifest (every file's size and sha256),
written last into a private staging directory that is then renamed into place. So an entry
that exists is either complete or damaged after the fact, and a damaged one (a truncated or
changed file, a missing manifest) is detected by the manifest and rebuilt. Concurrent first
uses (the engines of a fleet starting at once) each build in their own staging directory;
the first rename wins and the others use its result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from rollserve.models.make_tiny import make_tiny_model
from rollserve.utils.cache import cache_dir

logger = logging.getLogger(__name__)

MANIFEST = "rollserve-manifest.json"


def models_dir() -> Path:
    return cache_dir() / "models"


def ensure_tiny_model(preset: str, seed: int = 0) -> Path:
    """Path of the random-weight `preset` checkpoint for `seed`, built on first use."""
    return build_once(models_dir() / f"{preset}-seed{seed}",
                      lambda staging: make_tiny_model(staging, preset, seed),
                      f"random-weight {preset} checkpoint")


def build_once(target: Path, build: Callable[[Path], object], what: str) -> Path:
    """`target`, built by `build(staging_dir)` unless a complete copy is already there."""
    problem = manifest_problem(target)
    if problem is None:
        return target
    if target.exists():
        logger.warning("the cached %s at %s is damaged (%s): rebuilding it", what, target, problem)
        _discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        write_manifest(staging)
        os.replace(staging, target)
    except OSError:
        if manifest_problem(target) is not None:  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_manifest(directory: Path) -> None:
    files = {path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(directory.iterdir()) if path.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def manifest_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete cache entry, or None when it is."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "missing" if not directory.exists() else f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _discard(target: Path) -> None:
    """Move a damaged entry aside before deleting it, so no reader sees it half-deleted.
    Another process may have moved it already."""
    aside = target.with_name(f".{target.name}-damaged-{os.getpid()}")
    try:
        os.replace(target, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
