"""The FastAPI application over one engine: its state, its guard and its routers.

Every route turns bad input into HTTP 4xx `{"error": {"message": ...}}` (request bodies
through server.bodies); anything unexpected becomes a logged 500 and the server keeps
serving. A client that disconnects has its requests aborted (server.generation).
"""

from __future__ import annotations

from fastapi import FastAPI

import rollserve
from rollserve.engine.api import EngineAPI
from rollserve.server import admin, native, openai_api, weights_api
from rollserve.server.args import ServerArgs
from rollserve.server.errors import RequestError, request_error_handler
from rollserve.server.guard import GuardMiddleware
from rollserve.server.state import ServerState


def build_app(engine: EngineAPI, args: ServerArgs) -> FastAPI:
    app = FastAPI(title="rollserve", version=rollserve.__version__)
    app.state.server = ServerState.create(engine, args)
    app.add_middleware(GuardMiddleware, api_key=args.api_key,
                       max_request_bytes=args.max_request_bytes)
    app.add_exception_handler(RequestError, request_error_handler)
    for module in (native, openai_api, admin, weights_api):
        app.include_router(module.router)
    return app
