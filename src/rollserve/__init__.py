"""rollserve: LLM generation serving for reinforcement-learning and post-training jobs."""

from rollserve.engine.args import EngineArgs
from rollserve.engine.engine import Engine
from rollserve.engine.sampling_params import SamplingParams
from rollserve.server.args import ServerArgs

__all__ = ["Engine", "EngineArgs", "SamplingParams", "ServerArgs"]
__version__ = "0.1.0"
