"""rollserve: LLM generation serving for reinforcement-learning and post-training jobs."""

from rollserve.engine.args import EngineArgs
from rollserve.engine.engine import Engine
from rollserve.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineArgs", "SamplingParams"]
__version__ = "0.1.0"
