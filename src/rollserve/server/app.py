"""The FastAPI application over one engine.

Every handler turns bad input into HTTP 400 `{"error": {"message": ...}}`; anything
unexpected becomes a logged 500 and the server keeps serving. A client that disconnects has
its requests aborted (their KV slots are freed at the next engine step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import rollserve
from rollserve.engine.engine_process import AnyEngine
from rollserve.engine.validation import GenerateInput
from rollserve.server import openai_api
from rollserve.server.args import ServerArgs, is_inline_template
from rollserve.server.errors import RequestError, error_response
from rollserve.server.metrics import ServerMetrics
from rollserve.server.native import parse_generate
from rollserve.server.weights_api import install_weight_routes

logger = logging.getLogger(__name__)

Update = tuple[int, dict[str, Any], bool]


@dataclass(slots=True)
class ServerState:
    engine: AnyEngine
    args: ServerArgs
    chat_template: str | None
    sampling_defaults: dict[str, Any]
    metrics: ServerMetrics | None
    ready: bool = False
    started: float = field(default_factory=time.time)


def build_app(engine: AnyEngine, args: ServerArgs) -> FastAPI:
    state = ServerState(
        engine, args, _load_chat_template(args.chat_template),
        args.preferred_sampling_defaults(),
        ServerMetrics(engine) if args.enable_metrics else None,
    )
    app = FastAPI(title="rollserve", version=rollserve.__version__)
    app.state.server = state
    _install_middleware(app, state)
    _install_native_routes(app, state)
    _install_openai_routes(app, state)
    _install_admin_routes(app, state)
    install_weight_routes(app, engine, args, lambda r: _json_body(r, args.max_request_bytes))
    return app


def _load_chat_template(value: str | None) -> str | None:
    """The template itself, or a path's contents (ServerArgs checked it is one or the other)."""
    if value is None or is_inline_template(value):
        return value
    return Path(value).read_text()


# ---- cross-cutting ---------------------------------------------------------------------

def _install_middleware(app: FastAPI, state: ServerState) -> None:
    app.add_middleware(GuardMiddleware, api_key=state.args.api_key,
                       max_request_bytes=state.args.max_request_bytes)

    @app.exception_handler(RequestError)
    async def bad_request(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(str(exc), exc.status)


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


async def _json_body(request: Request, limit: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"request body exceeds the limit of {limit} bytes", 413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from exc


def _prepare(engine: AnyEngine, *args: Any, **kwargs: Any) -> tuple[bool, list[GenerateInput]]:
    """engine.prepare, its validation errors as 400s. Only these: any other ValueError is a
    bug, answered 500 and logged by GuardMiddleware."""
    try:
        return engine.prepare(*args, **kwargs)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


async def _updates(
    request: Request, engine: AnyEngine, inputs: list[GenerateInput], stream: bool
) -> AsyncIterator[Update]:
    """Engine updates for `inputs`; aborts them when the client goes away. One watcher task
    per HTTP request waits for the disconnect: per-update polling cost a task and a timer
    for every streamed token."""
    updates = engine.stream_inputs(inputs, stream)
    watcher = asyncio.create_task(_abort_on_disconnect(request, engine, inputs))
    try:
        async for update in updates:
            yield update
    finally:
        watcher.cancel()
        await updates.aclose()  # aborts whatever is still running


async def _abort_on_disconnect(request: Request, engine: AnyEngine,
                               inputs: list[GenerateInput]) -> None:
    # Anything before the disconnect is body the handler did not read (a GET's empty one).
    # uvicorn also reports a disconnect once the response is complete, by which time this
    # task has been cancelled.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for item in inputs:
        engine.abort(item.rid)


async def _collect(request: Request, engine: AnyEngine, inputs: list[GenerateInput]
                   ) -> list[dict[str, Any]] | None:
    """Final outputs, or None when the client went away (its requests were aborted)."""
    outputs: list[dict[str, Any]] = [{} for _ in inputs]
    async for index, output, finished in _updates(request, engine, inputs, stream=False):
        if finished:
            outputs[index] = output
    return None if await request.is_disconnected() else outputs


def _sse(payload: Any) -> bytes:
    # orjson, as SGLang streams: the stdlib encoder was a quarter of the event loop's CPU
    # per event, payloads being cumulative. Non-finite floats become null.
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _event_stream(request: Request, frames: AsyncIterator[bytes]) -> StreamingResponse:
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
        yield _sse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                              "type": "internal_error", "code": 500}})
        yield SSE_DONE


# ---- native API ------------------------------------------------------------------------

def _install_native_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        parsed = parse_generate(
            await _json_body(request, state.args.max_request_bytes), state.sampling_defaults
        )
        stream = parsed.pop("stream")
        batched, inputs = _prepare(engine, **parsed)
        single = not batched and len(inputs) == 1
        if stream:
            return _event_stream(request, _stream_native(request, engine, inputs, single))
        outputs = await _collect(request, engine, inputs)
        if outputs is None:
            return error_response("client disconnected", 499)
        return JSONResponse(outputs[0] if single else outputs)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await _json_body(request, state.args.max_request_bytes)
        prompt = body.get("prompt", body.get("text")) if isinstance(body, dict) else None
        add_special = body.get("add_special_tokens", True) if isinstance(body, dict) else True
        if isinstance(prompt, str):
            ids = engine.tokenizer.encode(prompt, add_special_tokens=add_special)
            return JSONResponse({"tokens": ids, "count": len(ids),
                                 "max_model_len": engine.context_len})
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            ids = [engine.tokenizer.encode(p, add_special_tokens=add_special) for p in prompt]
            return JSONResponse({"tokens": ids, "count": [len(i) for i in ids],
                                 "max_model_len": engine.context_len})
        raise RequestError("'prompt' must be a string or a list of strings")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await _json_body(request, state.args.max_request_bytes)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = engine.model_config.vocab_size
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            raise RequestError("'tokens' must be a list of token ids")
        if any(not 0 <= t < vocab for t in tokens):
            raise RequestError(f"'tokens' has ids outside the vocabulary [0, {vocab})")
        return JSONResponse({"text": engine.tokenizer.decode(tokens)})


async def _stream_native(request: Request, engine: AnyEngine, inputs: list[GenerateInput],
                         single: bool) -> AsyncIterator[bytes]:
    async for index, output, _finished in _updates(request, engine, inputs, stream=True):
        yield _sse(output if single else {**output, "index": index})
    yield SSE_DONE


# ---- OpenAI API ------------------------------------------------------------------------

def _install_openai_routes(app: FastAPI, state: ServerState) -> None:
    engine, args = state.engine, state.args

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": args.model_name, "object": "model", "created": int(state.started),
            "owned_by": "rollserve", "root": args.model_path,
            "max_model_len": engine.context_len,
        }]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _json_body(request, args.max_request_bytes)
        parsed = openai_api.parse_chat(body, engine.tokenizer, state.chat_template,
                                       state.sampling_defaults)
        return await _openai_response(request, state, parsed, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json_body(request, args.max_request_bytes)
        parsed = openai_api.parse_completion(body, engine.tokenizer, state.sampling_defaults)
        return await _openai_response(request, state, parsed, chat=False)


async def _openai_response(request: Request, state: ServerState,
                           parsed: openai_api.OpenAIRequest, chat: bool) -> Response:
    engine = state.engine
    want_logprobs = parsed.logprobs
    _, inputs = _prepare(
        engine, None, parsed.sampling, parsed.prompt_ids, return_logprob=want_logprobs,
        top_logprobs_num=parsed.top_logprobs, return_text_in_logprobs=True, rid=parsed.rid,
    )
    n = len(inputs) // len(parsed.prompt_ids)
    model = parsed.model or state.args.model_name
    if parsed.stream:
        frames = (_stream_chat if chat else _stream_completion)(
            request, engine, inputs, parsed, model, n)
        return _event_stream(request, frames)
    outputs = await _collect(request, engine, inputs)
    if outputs is None:
        return error_response("client disconnected", 499)
    make_choice = _chat_choice if chat else _completion_choice
    choices = [make_choice(i, o, want_logprobs) for i, o in enumerate(outputs)]
    return JSONResponse({
        "id": openai_api.new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": openai_api.now(), "model": model, "choices": choices,
        "usage": openai_api.usage(outputs, len(parsed.prompt_ids), n),
    })


def _chat_choice(index: int, output: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    return {
        "index": index, "message": {"role": "assistant", "content": output["text"]},
        "logprobs": openai_api.chat_logprobs(output, 0) if logprobs else None,
        "finish_reason": openai_api.finish_reason(output),
        "matched_stop": openai_api.matched_stop(output),
    }


def _completion_choice(index: int, output: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    return {
        "index": index, "text": output["text"],
        "logprobs": openai_api.completion_logprobs(output) if logprobs else None,
        "finish_reason": openai_api.finish_reason(output),
        "matched_stop": openai_api.matched_stop(output),
    }


async def _stream_chat(request: Request, engine: AnyEngine, inputs: list[GenerateInput],
                       parsed: openai_api.OpenAIRequest, model: str, n: int
                       ) -> AsyncIterator[bytes]:
    chunk_id, created = openai_api.new_id("chatcmpl"), openai_api.now()

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": choices, **extra})

    for i in range(len(inputs)):
        yield frame([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    sent_text, sent_tokens = [0] * len(inputs), [0] * len(inputs)
    finals: list[dict[str, Any]] = [{} for _ in inputs]
    async for index, output, finished in _updates(request, engine, inputs, stream=True):
        text = output["text"]
        delta = text[sent_text[index]:]
        logprobs = (openai_api.chat_logprobs(output, sent_tokens[index])
                    if parsed.logprobs else None)
        sent_text[index], sent_tokens[index] = len(text), len(output["output_ids"])
        if delta or finished or (logprobs and logprobs["content"]):
            choice = {"index": index, "delta": {"content": delta} if delta else {},
                      "logprobs": logprobs, "finish_reason": None}
            if finished:
                choice["finish_reason"] = openai_api.finish_reason(output)
                choice["matched_stop"] = openai_api.matched_stop(output)
            yield frame([choice])
        if finished:
            finals[index] = output
    if parsed.include_usage and all(finals):
        yield frame([], usage=openai_api.usage(finals, len(parsed.prompt_ids), n))
    yield SSE_DONE


async def _stream_completion(request: Request, engine: AnyEngine, inputs: list[GenerateInput],
                             parsed: openai_api.OpenAIRequest, model: str, n: int
                             ) -> AsyncIterator[bytes]:
    chunk_id, created = openai_api.new_id("cmpl"), openai_api.now()
    sent_text, sent_tokens = [0] * len(inputs), [0] * len(inputs)
    finals: list[dict[str, Any]] = [{} for _ in inputs]
    base = {"id": chunk_id, "object": "text_completion", "created": created, "model": model}
    async for index, output, finished in _updates(request, engine, inputs, stream=True):
        delta = output["text"][sent_text[index]:]
        logprobs = (openai_api.completion_logprobs(output, sent_tokens[index])
                    if parsed.logprobs else None)
        sent_text[index], sent_tokens[index] = len(output["text"]), len(output["output_ids"])
        if delta or finished or (logprobs and logprobs["tokens"]):
            yield _sse({**base, "choices": [{
                "index": index, "text": delta, "logprobs": logprobs,
                "finish_reason": openai_api.finish_reason(output) if finished else None}]})
        if finished:
            finals[index] = output
    if parsed.include_usage and all(finals):
        yield _sse({**base, "choices": [],
                    "usage": openai_api.usage(finals, len(parsed.prompt_ids), n)})
    yield SSE_DONE


# ---- health, info, admin ----------------------------------------------------------------

def _install_admin_routes(app: FastAPI, state: ServerState) -> None:
    engine, args = state.engine, state.args

    @app.get("/health")
    async def health() -> Response:
        if not state.ready:
            return error_response("engine is warming up", 503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        _, inputs = engine.prepare(None, {"max_new_tokens": 1, "temperature": 0.0}, [0])
        outputs = await _collect(request, engine, inputs)
        if outputs is None or outputs[0]["meta_info"]["finish_reason"]["type"] == "abort":
            return error_response("engine failed to generate", 503)
        return Response(status_code=200)

    def model_info() -> dict[str, Any]:
        return {
            "model_path": args.model_path,
            "tokenizer_path": args.tokenizer_path or args.model_path,
            "is_generation": True, "weight_version": engine.weight_version,
            "architecture": engine.model_config.architecture,
            "max_context_length": engine.context_len,
        }

    def server_info() -> dict[str, Any]:
        stats = engine.stats()
        return {**args.to_dict(), "tp_size": args.tp_size, "dp_size": 1,
                "version": rollserve.__version__, "weight_version": engine.weight_version,
                "max_total_num_tokens": stats["kv_pool_size"], "internal_states": [stats]}

    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, lambda: JSONResponse(model_info()), methods=["GET"])
    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, lambda: JSONResponse(server_info()), methods=["GET"])

    @app.get("/get_load")
    async def get_load() -> JSONResponse:
        # stats() waits for the engine thread, which may be busy for a while (a long step,
        # re-packing new weights): never on the event loop.
        stats = await asyncio.to_thread(engine.stats)
        return JSONResponse({
            "num_reqs": stats["num_running_reqs"] + stats["num_waiting_reqs"],
            "num_running_reqs": stats["num_running_reqs"],
            "num_waiting_reqs": stats["num_waiting_reqs"],
            "num_tokens": stats["kv_used_tokens"],
            "kv_usage": stats["kv_used_tokens"] / stats["kv_pool_size"],
        })

    async def flush_cache() -> JSONResponse:
        freed = await asyncio.to_thread(engine.flush_cache)
        return JSONResponse({"success": True, "freed_tokens": freed,
                             "message": "dropped every cache entry no running request uses"})

    app.add_api_route("/flush_cache", flush_cache, methods=["GET", "POST"])

    @app.post("/abort_request")
    async def abort_request(request: Request) -> JSONResponse:
        body = await _json_body(request, args.max_request_bytes)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("abort_all"):
            engine.abort_all()
        elif isinstance(body.get("rid"), str):
            engine.abort(body["rid"])
        else:
            raise RequestError("give 'rid' (a string) or 'abort_all': true")
        return JSONResponse({"success": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return error_response("metrics are off; start the server with --enable-metrics", 404)
        body, content_type = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type=content_type)
