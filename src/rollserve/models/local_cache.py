"""Built-once copies of the embedded default models, for demos and benchmarks."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rollserve.cache import cache_dir
from rollserve.models.make_tiny import make_tiny_model


def ensure_tiny_model(preset: str, seed: int = 0) -> Path:
    """Path of the `preset` checkpoint for `seed`, building it on first use. Built in a
    temporary directory and renamed into place, so concurrent callers never see half a model."""
    target = cache_dir() / "models" / f"{preset}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make_tiny_model(staging, preset, seed)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
