"""What every handler works on: the server's one engine, its settings and its request
defaults, held in `app.state.server` and handed to handlers as the `State` dependency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from rollserve.engine.api import EngineAPI
from rollserve.server.args import ServerArgs, is_inline_template
from rollserve.server.metrics import ServerMetrics


@dataclass(slots=True)
class ServerState:
    engine: EngineAPI
    args: ServerArgs
    chat_template: str | None
    sampling_defaults: dict[str, Any]
    metrics: ServerMetrics | None
    ready: bool = False  # set once the warm-up generation succeeded (launch)
    started: float = field(default_factory=time.time)

    @classmethod
    def create(cls, engine: EngineAPI, args: ServerArgs) -> ServerState:
        return cls(engine, args, _load_chat_template(args.chat_template),
                   args.preferred_sampling_defaults(),
                   ServerMetrics(engine) if args.enable_metrics else None)


def _load_chat_template(value: str | None) -> str | None:
    """The template itself, or a path's contents (ServerArgs checked it is one or the other)."""
    if value is None or is_inline_template(value):
        return value
    return Path(value).read_text()


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]
