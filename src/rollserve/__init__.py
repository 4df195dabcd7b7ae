"""rollserve: LLM generation serving for reinforcement-learning and post-training jobs."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollserve.engine.args import EngineArgs
    from rollserve.engine.engine import Engine
    from rollserve.engine.engine_process import EngineProcess
    from rollserve.engine.sampling_params import SamplingParams
    from rollserve.server.args import ServerArgs

__all__ = ["Engine", "EngineArgs", "EngineProcess", "SamplingParams", "ServerArgs"]
__version__ = "0.1.0"

# Loaded on first use: importing the package must not import torch, so that a process can
# still set libgomp's environment, which it reads when torch loads it (the test suite sets
# GOMP_SPINCOUNT this way: README, "Engine").
_EXPORTS = {
    "Engine": "rollserve.engine.engine",
    "EngineArgs": "rollserve.engine.args",
    "EngineProcess": "rollserve.engine.engine_process",
    "SamplingParams": "rollserve.engine.sampling_params",
    "ServerArgs": "rollserve.server.args",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rollserve' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
