"""Shared fixtures: tiny random-weight checkpoints built offline, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Returns build(preset, **options) -> checkpoint path, memoised per session/worker."""
    from rollserve.models.make_tiny import make_tiny_model

    built: dict[tuple, Path] = {}

    def build(preset: str = "llama", seed: int = 0, **options: object) -> Path:
        key = (preset, seed, tuple(sorted(options.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"model-{preset}")
            built[key] = make_tiny_model(path, preset, seed, **options)
        return built[key]

    return build


@pytest.fixture(scope="session")
def llama_path(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
