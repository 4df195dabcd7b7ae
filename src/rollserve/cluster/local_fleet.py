"""`LocalFleet`: engine servers (+ the router when there are several) as child processes of
this one, on 127.0.0.1, without Ray. What `RolloutService.from_pretrained` manages.

The processes die with this one (see `rollserve.utils.process`) and stop on `shutdown()` or at
interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Any

from rollserve.client import InferenceHTTPClient
from rollserve.cluster.args import FleetArgs
from rollserve.cluster.router import RouterAPI
from rollserve.utils.process import ManagedProcess, free_port

HOST = "127.0.0.1"


class LocalFleet:
    """`dp_size` engines of `model_path`; `url` is the router's (dp_size > 1) or the engine's.

    `server_kwargs` are `ServerArgs` fields (checked before anything starts); each engine
    gets an equal share of the CPU threads.
    """

    def __init__(self, model_path: str, *, dp_size: int = 1, log_dir: str | None = None,
                 startup_timeout: float = 600.0, **server_kwargs: Any) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.args = FleetArgs(model_path=str(model_path), server=dict(server_kwargs),
                              router={"policy": "cache_aware"})
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="rollserve-local-"))
        self.engines: list[ManagedProcess] = []
        self.engine_urls: list[str] = []
        self.router: ManagedProcess | None = None
        atexit.register(self.shutdown)
        try:
            self._start_engines(dp_size, startup_timeout)
            self.url = self._start_router(startup_timeout) if dp_size > 1 else self.engine_urls[0]
        except BaseException:
            self.shutdown()
            raise

    def _start_engines(self, count: int, timeout: float) -> None:
        threads = str(max(1, (os.cpu_count() or 1) // count))
        for index in range(count):
            port = free_port(HOST)
            self.engine_urls.append(f"http://{HOST}:{port}")
            self.engines.append(ManagedProcess(
                self.args.server_command(HOST, port, None), self.log_dir / f"engine-{index}.log",
                {"OMP_NUM_THREADS": threads}))
            self.engines[-1].start()  # all start at once; their readiness is awaited below
        for index, (engine, url) in enumerate(zip(self.engines, self.engine_urls, strict=True)):
            client = InferenceHTTPClient(url, trust_env=False)  # internal: no proxy
            error = engine.wait_ready(client.health, timeout)
            if error is not None:
                raise RuntimeError(f"engine {index} of {self.args.server['model_path']} {error}")

    def _start_router(self, timeout: float) -> str:
        port = free_port(HOST)
        url = f"http://{HOST}:{port}"
        api = RouterAPI(url)
        self.router = ManagedProcess(self.args.router_command(HOST, port, free_port(HOST)),
                                     self.log_dir / "router.log")
        error = self.router.start_and_wait(api.is_up, timeout)
        if error is not None:
            raise RuntimeError(f"router {error}")
        for engine_url in self.engine_urls:
            api.register(engine_url, timeout)
        return url

    def shutdown(self) -> None:
        """Stops the router and every engine; safe to call more than once."""
        for process in [self.router, *self.engines]:
            if process is not None:
                process.stop()
        self.router, self.engines = None, []
        atexit.unregister(self.shutdown)
