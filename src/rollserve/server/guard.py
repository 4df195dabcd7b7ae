"""`GuardMiddleware`: what every request passes before any route sees it, and the last
word on anything a handler did not expect."""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rollserve.server.errors import error_response

logger = logging.getLogger(__name__)


class GuardMiddleware:
    """API key, body-size limit, and a JSON 500 for anything a handler did not expect (the
    server keeps serving). Plain ASGI: Starlette's `@app.middleware("http")` would pass every
    streamed SSE chunk through an extra memory stream and task."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int) -> None:
        self.app, self.api_key, self.max_request_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:  # never let one request take the server down
            logger.exception("internal error serving %s", scope["path"])
            if not started:  # once a response has begun, closing it is all that is left
                await error_response(f"internal error: {type(exc).__name__}: {exc}", 500)(
                    scope, receive, send
                )

    def _refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        if (self.api_key and scope["path"] != "/health"
                and headers.get("authorization") != f"Bearer {self.api_key}"):
            return error_response("missing or wrong API key (Authorization: Bearer ...)", 401)
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_request_bytes:
            return error_response(
                f"request body of {length} bytes exceeds the limit of {self.max_request_bytes}",
                413,
            )
        return None
