"""Ray actors that each own one process on their node: an engine server, or the router.

An actor binds its process to its node's address on a free port, waits until it answers,
and reports failures as data (`Started.error` with the log tail) rather than as exceptions,
so the driver can name every engine that failed. The process dies with its actor (see
`rollserve.utils.process`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from rollserve.client import InferenceHTTPClient
from rollserve.cluster.args import FleetArgs
from rollserve.cluster.router import RouterAPI
from rollserve.utils.process import ManagedProcess, free_port


@dataclass(slots=True, frozen=True)
class Started:
    """What a launch produced: the URL, or an error message that includes the log tail."""

    name: str
    url: str | None
    error: str | None
    log_path: str
    pid: int | None


class _ProcessOwner:
    def __init__(self, name: str, log_dir: str, host: str) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.host = host  # this node's address as the driver sees it (NodeInfo.ip)
        self.url: str | None = None
        self.process: ManagedProcess | None = None

    def get_url(self) -> str | None:
        return self.url

    def get_pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def get_node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.stop()

    def _start(self, command: list[str], env: dict[str, str], cpu_cores: list[int] | None,
               ready: Callable[[], bool], timeout: float) -> Started:
        self.process = ManagedProcess(command, self.log_path, env, cpu_cores)
        error = self.process.start_and_wait(ready, timeout)
        if error is not None:
            return Started(self.name, None, f"{self.name} on {self.host} {error}",
                           str(self.log_path), None)
        return Started(self.name, self.url, None, str(self.log_path), self.process.pid)


class EngineServerWorker(_ProcessOwner):
    """One engine server (`rollserve.launch_server` or `sglang.launch_server`)."""

    def __init__(self, name: str, log_dir: str, host: str) -> None:
        super().__init__(name, log_dir, host)

    def launch(self, args: FleetArgs, env: dict[str, str], cpu_core_ids: list[int] | None,
               timeout: float) -> Started:
        port = free_port(self.host)
        dist_init_addr = (f"{self.host}:{free_port(self.host)}"
                          if args.server_type == "sglang" and args.ranks_per_engine > 1
                          else None)
        self.url = f"http://{self.host}:{port}"
        self._client = InferenceHTTPClient(self.url, trust_env=False)  # internal: no proxy
        cores = _node_cores(cpu_core_ids)
        if cores:
            env = {**env, "OMP_NUM_THREADS": str(len(cores))}
        command = args.server_command(self.host, port, dist_init_addr)
        return self._start(command, env, cores, self.is_healthy, timeout)

    def is_healthy(self) -> bool:
        if self.process is None or self.process.exit_code() is not None:
            return False
        return self._client.health()


class RouterWorker(_ProcessOwner):
    """The sglang-router process, and worker registration on it."""

    api: RouterAPI

    def launch(self, args: FleetArgs, timeout: float) -> Started:
        host = str(args.router.get("host") or self.host)
        port = int(args.router.get("port") or free_port(self.host))
        metrics_port = int(args.router.get("prometheus_port") or free_port(self.host))
        self.url = f"http://{self.host if host in ('0.0.0.0', '::') else host}:{port}"
        self.api = RouterAPI(self.url)
        command = args.router_command(host, port, metrics_port)
        return self._start(command, {}, None, self.api.is_up, timeout)

    def register(self, worker_url: str, timeout: float = 300.0) -> str:
        return self.api.register(worker_url, timeout)

    def unregister(self, worker_url: str) -> None:
        self.api.unregister(worker_url)

    def list_workers(self) -> list[dict]:
        return self.api.workers()

    def is_healthy(self) -> bool:
        alive = self.process is not None and self.process.exit_code() is None
        return alive and self.api.is_up()


def _node_cores(core_ids: list[int] | None) -> list[int] | None:
    """Logical core ids -> this node's usable cores (wrapping around if the node has fewer)."""
    if not core_ids:
        return None
    usable = sorted(os.sched_getaffinity(0))
    return sorted({usable[i % len(usable)] for i in core_ids})


EngineServerActor = ray.remote(num_cpus=0)(EngineServerWorker)
RouterActor = ray.remote(num_cpus=0)(RouterWorker)
