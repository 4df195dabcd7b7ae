"""The typed messages between `EngineProcess` (the parent) and the engine in its child.

Parent to child: `Submit`, `Abort`, `AbortAll`, `Call` (carrying one `EngineCall`) and
`Shutdown`. Child to parent: `Ready` or `Failed` once, then `Outputs` after every pass of the
engine loop that produced any, and one `Result` per `Call`.

Every `EngineCall` is one call of `EngineAPI`, with that call's arguments as fields; its
`run` makes the call on the child's engine. So a call crosses the pipe as data naming its
own behaviour, and adding an engine call means adding its class here.
"""

from __future__ import annotations

import pickle
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rollserve.engine.api import EngineAPI
from rollserve.engine.latency import Histogram
from rollserve.engine.validation import GenerateInput, RequestLimits
from rollserve.models.config import ModelConfig

T = TypeVar("T")
Output = tuple[int, int, dict[str, Any], bool]  # batch, index, output, finished


class RemoteTraceback(Exception):
    """Where in the engine process an error was raised: the `__cause__` of the exception
    raised here, so a logged error shows the engine's frames, not only the pipe's."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(slots=True, frozen=True)
class RemoteError:
    """An exception raised in the engine process, with its traceback as text (a pickled
    exception loses its traceback)."""

    exception: BaseException
    traceback: str

    @classmethod
    def capture(cls, exc: BaseException) -> RemoteError:
        return cls(_picklable(exc), "".join(traceback.format_exception(exc)))

    def reraisable(self) -> BaseException:
        self.exception.__cause__ = RemoteTraceback(self.traceback)
        return self.exception


def _picklable(exc: BaseException) -> BaseException:
    """`exc` itself when it survives the pipe (a ValueError stays a ValueError, for the
    server's 400s), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ---- parent to child ------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Submit:
    batch: int
    inputs: list[GenerateInput]
    stream: bool


@dataclass(slots=True, frozen=True)
class Abort:
    rid: str


@dataclass(slots=True, frozen=True)
class AbortAll:
    message: str


@dataclass(slots=True, frozen=True)
class Shutdown:
    pass


class EngineCall(ABC, Generic[T]):
    """One EngineAPI call and its arguments."""

    @abstractmethod
    def run(self, engine: EngineAPI) -> T: ...


@dataclass(slots=True, frozen=True)
class Call:
    call_id: int
    request: EngineCall


# ---- child to parent ------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Ready:
    """What the parent needs without asking: sent once the model is loaded."""

    model_config: ModelConfig
    context_len: int
    limits: RequestLimits
    device: str


@dataclass(slots=True, frozen=True)
class Failed:
    error: RemoteError


@dataclass(slots=True, frozen=True)
class Outputs:
    items: list[Output]


@dataclass(slots=True, frozen=True)
class Result:
    call_id: int
    error: RemoteError | None
    value: Any


# ---- the calls ------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class FlushCache(EngineCall[int]):
    def run(self, engine: EngineAPI) -> int:
        return engine.flush_cache()


@dataclass(slots=True, frozen=True)
class Stats(EngineCall[dict[str, Any]]):
    def run(self, engine: EngineAPI) -> dict[str, Any]:
        return engine.stats()


@dataclass(slots=True, frozen=True)
class LatencyHistograms(EngineCall[dict[str, Histogram]]):
    def run(self, engine: EngineAPI) -> dict[str, Histogram]:
        return engine.latency_histograms()


@dataclass(slots=True, frozen=True)
class WeightVersion(EngineCall[str]):
    def run(self, engine: EngineAPI) -> str:
        return engine.weight_version


@dataclass(slots=True, frozen=True)
class WeightsMetadata(EngineCall[dict[str, Any]]):
    def run(self, engine: EngineAPI) -> dict[str, Any]:
        return engine.weights_metadata()


@dataclass(slots=True, frozen=True)
class GetWeightsByName(EngineCall[list]):
    name: str
    truncate_size: int

    def run(self, engine: EngineAPI) -> list:
        return engine.get_weights_by_name(self.name, self.truncate_size)


@dataclass(slots=True, frozen=True)
class InitWeightsUpdateGroup(EngineCall[None]):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str

    def run(self, engine: EngineAPI) -> None:
        engine.init_weights_update_group(self.master_address, self.master_port,
                                         self.rank_offset, self.world_size, self.group_name,
                                         self.backend)


@dataclass(slots=True, frozen=True)
class DestroyWeightsUpdateGroup(EngineCall[None]):
    group_name: str

    def run(self, engine: EngineAPI) -> None:
        engine.destroy_weights_update_group(self.group_name)


@dataclass(slots=True, frozen=True)
class UpdateWeightsFromDistributed(EngineCall[str]):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    flush_cache: bool
    weight_version: str | None
    load_format: str | None
    abort_all_requests: bool
    apply: bool

    def run(self, engine: EngineAPI) -> str:
        return engine.update_weights_from_distributed(
            self.names, self.dtypes, self.shapes, self.group_name, self.flush_cache,
            self.weight_version, self.load_format, self.abort_all_requests, self.apply,
        )


@dataclass(slots=True, frozen=True)
class UpdateWeightsFromSerialized(EngineCall[str]):
    payload: str | list[str]  # one for every TP rank, or one each
    load_format: str | None
    flush_cache: bool
    weight_version: str | None
    abort_all_requests: bool
    apply: bool

    def run(self, engine: EngineAPI) -> str:
        return engine.update_weights_from_serialized(
            self.payload, self.load_format, self.flush_cache, self.weight_version,
            self.abort_all_requests, self.apply,
        )


@dataclass(slots=True, frozen=True)
class UpdateWeightsFromDisk(EngineCall[str]):
    model_path: str
    flush_cache: bool
    weight_version: str | None
    abort_all_requests: bool

    def run(self, engine: EngineAPI) -> str:
        return engine.update_weights_from_disk(self.model_path, self.flush_cache,
                                               self.weight_version, self.abort_all_requests)


@dataclass(slots=True, frozen=True)
class PauseGeneration(EngineCall[None]):
    mode: str

    def run(self, engine: EngineAPI) -> None:
        engine.pause_generation(self.mode)


@dataclass(slots=True, frozen=True)
class ContinueGeneration(EngineCall[None]):
    def run(self, engine: EngineAPI) -> None:
        engine.continue_generation()
