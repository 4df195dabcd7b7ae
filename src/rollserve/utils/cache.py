"""Where rollserve keeps what it builds once per machine (default models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ROLLSERVE_CACHE", Path.home() / ".cache" / "rollserve"))
