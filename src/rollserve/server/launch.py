"""Run one engine behind the HTTP server until SIGTERM/SIGINT.

Start-up logs the model, dtype, device and KV pool size, warms the engine while `/health`
answers 503, then logs one ready line with the URL. On a signal, requests in flight are
finished with an abort reason before the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from rollserve.engine.api import EngineAPI
from rollserve.engine.engine_process import LOG_FORMAT, EngineProcess
from rollserve.server.app import build_app
from rollserve.server.args import ServerArgs

logger = logging.getLogger("rollserve.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineAPI) -> None:
        super().__init__(config)
        self.engine = engine
        self.warm_up_failed = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Give every in-flight request its abort finish now, so responses end promptly. From
        # another thread: this handler interrupts the event loop's thread, which may be
        # holding the engine pipe's send lock at that moment.
        threading.Thread(target=self.engine.abort_all, args=("server shutting down",),
                         daemon=True).start()
        super().handle_exit(sig, frame)


def launch_server(args: ServerArgs) -> None:
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    server: _Server | None = None

    def engine_exited() -> None:
        if server is not None:
            server.should_exit = True

    engine = EngineProcess(args.engine_args(), logging.getLogger().level, engine_exited)
    try:
        app = build_app(engine, args)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5,
                                access_log=args.log_level == "debug")
        server = _Server(config, engine)
        app.router.lifespan_context = _lifespan(server, args)
        server.run()
    finally:
        engine.shutdown()
    if engine.crashed or (server is not None and server.warm_up_failed):
        raise SystemExit(1)


def _lifespan(server: _Server, args: ServerArgs):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_warm_up(app, server, args))
        yield
        task.cancel()

    return lifespan


async def _warm_up(app: FastAPI, server: _Server, args: ServerArgs) -> None:
    """Marks the server ready after one generation. An engine that cannot generate stops the
    server with exit status 1: it would otherwise answer 503 forever, silently."""
    try:
        if not args.skip_server_warmup:
            output = await server.engine.async_generate(
                input_ids=[0, 1, 2, 3], sampling_params={"max_new_tokens": 2, "temperature": 0.0}
            )
            reason = output["meta_info"]["finish_reason"]
            if reason["type"] == "abort":
                raise RuntimeError(f"warm-up generation aborted: {reason.get('message')}")
    except Exception:
        logger.exception("engine warm-up failed; shutting the server down")
        server.warm_up_failed = server.should_exit = True
        return
    app.state.server.ready = True
    logger.info("rollserve server ready: http://%s:%d (model %s)", args.host, args.port,
                args.model_name)
