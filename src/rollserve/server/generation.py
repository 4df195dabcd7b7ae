"""Running one HTTP request's generations on the engine: preparing them, collecting or
streaming their outputs as SSE, and aborting them when the client goes away (their KV slots
are freed at the next engine step). Shared by the native and the OpenAI routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse

from rollserve.engine.api import EngineAPI
from rollserve.engine.validation import GenerateInput
from rollserve.server.errors import RequestError

logger = logging.getLogger(__name__)

Update = tuple[int, dict[str, Any], bool]  # (input index, output so far, finished)
SSE_DONE = b"data: [DONE]\n\n"


def prepare(engine: EngineAPI, *args: Any, **kwargs: Any) -> tuple[bool, list[GenerateInput]]:
    """engine.prepare, its validation errors as 400s. Only these: any other ValueError is a
    bug, answered 500 and logged by GuardMiddleware."""
    try:
        return engine.prepare(*args, **kwargs)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


async def updates(request: Request, engine: EngineAPI, inputs: list[GenerateInput],
                  stream: bool) -> AsyncIterator[Update]:
    """Engine updates for `inputs`; aborts them when the client goes away. One watcher task
    per HTTP request waits for the disconnect: per-update polling cost a task and a timer
    for every streamed token."""
    engine_updates = engine.stream_inputs(inputs, stream)
    watcher = asyncio.create_task(_abort_on_disconnect(request, engine, inputs))
    try:
        async for update in engine_updates:
            yield update
    finally:
        watcher.cancel()
        await engine_updates.aclose()  # aborts whatever is still running


async def _abort_on_disconnect(request: Request, engine: EngineAPI,
                               inputs: list[GenerateInput]) -> None:
    # Anything before the disconnect is body the handler did not read (a GET's empty one).
    # uvicorn also reports a disconnect once the response is complete, by which time this
    # task has been cancelled.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for item in inputs:
        engine.abort(item.rid)


async def collect(request: Request, engine: EngineAPI, inputs: list[GenerateInput]
                  ) -> list[dict[str, Any]] | None:
    """Final outputs, or None when the client went away (its requests were aborted)."""
    outputs: list[dict[str, Any]] = [{} for _ in inputs]
    async for index, output, finished in updates(request, engine, inputs, stream=False):
        if finished:
            outputs[index] = output
    return None if await request.is_disconnected() else outputs


def sse(payload: Any) -> bytes:
    # orjson, as SGLang streams: the stdlib encoder was a quarter of the event loop's CPU
    # per event, payloads being cumulative. Non-finite floats become null.
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def event_stream(request: Request, frames: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(_ending_with_error_event(request, frames),
                             media_type="text/event-stream")


async def _ending_with_error_event(request: Request, frames: AsyncIterator[bytes]
                                   ) -> AsyncIterator[bytes]:
    """A failure after the stream has begun cannot become a 500 any more: as SGLang does, it
    ends the stream with an error event and [DONE] (the openai client raises on the event),
    and is logged. The requests are aborted as the frames' generator closes."""
    try:
        async for frame in frames:
            yield frame
    except Exception as exc:
        logger.exception("internal error while streaming %s", request.url.path)
        yield sse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                             "type": "internal_error", "code": 500}})
        yield SSE_DONE
