"""Handles on a launched fleet: `ServerGroup` (the engines) and `RouterGroup` (the router).

Their methods return `Pending` results whose `.wait()` gives a list (one entry per actor),
as in seed 004: `server_group.get_server_url().wait()`, `router_group.get_router_url()
.wait()[0]`. `shutdown()` is idempotent and stops whole process trees.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import RayActorError

T = TypeVar("T")
_RAISE = object()  # Pending(on_dead=_RAISE): a dead actor's error propagates


class Pending(Generic[T]):
    """Results of remote calls, one per actor; `wait()` returns them as a list.

    A call on an actor that has died yields `on_dead` instead of raising, where given.
    """

    def __init__(self, refs: Sequence[ray.ObjectRef] = (), *, values: Sequence[T] = (),
                 on_dead: Any = _RAISE, then: Callable[[], None] | None = None) -> None:
        self._refs = list(refs)
        self._values = list(values)
        self._on_dead = on_dead
        self._then = then

    def wait(self, timeout: float | None = None) -> list[T]:
        try:
            return self._values + [self._get(ref, timeout) for ref in self._refs]
        finally:  # runs also when a result is an error or the wait timed out
            then, self._then = self._then, None
            if then is not None:
                then()

    def _get(self, ref: ray.ObjectRef, timeout: float | None) -> T:
        try:
            return ray.get(ref, timeout=timeout)
        except RayActorError:
            if self._on_dead is _RAISE:
                raise
            return self._on_dead


@dataclass(slots=True, frozen=True)
class EngineInfo:
    """Where one engine runs and what it was given."""

    name: str
    url: str
    node_rank: int
    node_ip: str
    hardware_ranks: tuple[int, ...]  # ranks on its node: GPUs, or groups of CPU cores
    device: str  # "cuda:0,1" or "cpu cores 0-1"
    log_path: str


class _ActorGroup:
    def __init__(self, actors: list[Any]) -> None:
        self._actors = actors
        self._lock = threading.Lock()
        self._stopped = False
        atexit.register(self._shutdown_now)  # Ctrl-C or a normal exit of the driver

    def shutdown(self) -> Pending[None]:
        """Stops every process (SIGTERM, then SIGKILL) and the actors; safe to call twice."""
        with self._lock:
            if self._stopped:
                return Pending()
            self._stopped = True
        refs = [actor.shutdown.remote() for actor in self._actors]
        return Pending(refs, on_dead=None, then=self._kill_actors)

    def _shutdown_now(self) -> None:
        if ray.is_initialized():
            self.shutdown().wait(timeout=60)

    def _kill_actors(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        atexit.unregister(self._shutdown_now)

    def is_healthy(self) -> Pending[bool]:
        """Per process: it is alive and answers (engines: `GET /health` is 200)."""
        return self._each(lambda actor: actor.is_healthy.remote(), on_dead=False)

    def get_pid(self) -> Pending[int | None]:
        return self._each(lambda actor: actor.get_pid.remote(), on_dead=None)

    def get_node_id(self) -> Pending[str]:
        """The Ray node id each process runs on."""
        return self._each(lambda actor: actor.get_node_id.remote())

    def _each(self, call: Callable[[Any], Any], on_dead: Any = _RAISE) -> Pending[Any]:
        """`call(actor)` (which makes one remote call) on every actor."""
        return Pending([call(actor) for actor in self._actors], on_dead=on_dead)


class ServerGroup(_ActorGroup):
    """The engine servers of one launch."""

    def __init__(self, name: str, actors: list[Any], engines: list[EngineInfo]) -> None:
        super().__init__(actors)
        self.name = name
        self.engines = engines

    def get_server_url(self) -> Pending[str]:
        return Pending(values=[engine.url for engine in self.engines])


class RouterGroup(_ActorGroup):
    """The single sglang-router of one launch."""

    def __init__(self, name: str, actor: Any, url: str, node_rank: int) -> None:
        super().__init__([actor])
        self.name = name
        self.url = url
        self.node_rank = node_rank

    def get_router_url(self) -> Pending[str]:
        return Pending(values=[self.url])

    def register_server(self, url: str, timeout: float = 300.0) -> Pending[str]:
        """Adds a server; `.wait()` returns once the router reports it healthy."""
        return self._each(lambda actor: actor.register.remote(url, timeout))

    def unregister_server(self, url: str) -> Pending[None]:
        return self._each(lambda actor: actor.unregister.remote(url))

    def list_workers(self) -> Pending[list[dict]]:
        return self._each(lambda actor: actor.list_workers.remote())
