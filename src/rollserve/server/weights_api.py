"""SGLang's weight-update and pause endpoints over one engine.

Answers are SGLang's `{"success": bool, "message": str}`; a refused call is HTTP 400 whose body
also carries this server's usual `{"error": {"message": ...}}`. Every blocking engine call runs
on a worker thread: joining a group waits for all ranks and an update waits for the engine to
drain, while `/health` and `/generate` keep being served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rollserve.engine.engine_process import AnyEngine
from rollserve.server.args import ServerArgs
from rollserve.server.errors import RequestError, reject_unknown_fields
from rollserve.weights.updater import DEFAULT_GROUP, FLATTENED_BUCKET

logger = logging.getLogger(__name__)

JsonReader = Callable[[Request], Awaitable[Any]]
_REQUIRED = object()
# SGLang request fields that change nothing here: accepted with any value.
_NO_OPS = {"rid", "torch_empty_cache", "token_step", "disable_draft_model"}


@dataclass(slots=True, frozen=True)
class Field:
    kind: type | tuple[type, ...]
    default: Any = _REQUIRED


UPDATE_FIELDS = {
    "flush_cache": Field(bool, True), "abort_all_requests": Field(bool, False),
    "weight_version": Field(str, None), "apply": Field(bool, True),
}


def install_weight_routes(app: FastAPI, engine: AnyEngine, args: ServerArgs,
                          read_json: JsonReader) -> None:
    default_backend = "nccl" if engine.device.type == "cuda" else "gloo"

    async def fields(request: Request, spec: dict[str, Field]) -> dict[str, Any]:
        body = await read_json(request) if _has_body(request) else {}
        return _parse(body, spec)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> JSONResponse:
        f = await fields(request, {
            "master_address": Field(str), "master_port": Field(int), "rank_offset": Field(int),
            "world_size": Field(int), "group_name": Field(str, DEFAULT_GROUP),
            "backend": Field(str, default_backend),
        })
        return await _run(lambda: engine.init_weights_update_group(**f),
                          f"joined weights update group {f['group_name']!r} as rank "
                          f"{f['rank_offset']} of {f['world_size']}")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> JSONResponse:
        f = await fields(request, {"group_name": Field(str, DEFAULT_GROUP)})
        return await _run(lambda: engine.destroy_weights_update_group(**f),
                          f"left weights update group {f['group_name']!r}")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> JSONResponse:
        f = await fields(request, {
            "names": Field(list), "dtypes": Field(list), "shapes": Field(list),
            "group_name": Field(str, DEFAULT_GROUP), "load_format": Field(str, None),
            **UPDATE_FIELDS,
        })
        return await _run(lambda: engine.update_weights_from_distributed(**f))

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> JSONResponse:
        f = await fields(request, {
            "serialized_named_tensors": Field(list), "load_format": Field(str, None),
            **UPDATE_FIELDS,
        })
        payloads, load_format = f.pop("serialized_named_tensors"), f.pop("load_format")
        if load_format not in (None, "direct", FLATTENED_BUCKET):
            raise RequestError(f"load_format must be null, 'direct' or {FLATTENED_BUCKET!r}")
        if not payloads or not isinstance(payloads[0], str):
            raise RequestError("'serialized_named_tensors' must hold one base64 string per "
                               "tensor-parallel rank")
        # One entry per TP rank; this engine is rank 0.
        return await _run(lambda: engine.update_weights_from_serialized(
            payloads[0], load_format, **f))

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        f = await fields(request, {"model_path": Field(str), "load_format": Field(str, None),
                                   **UPDATE_FIELDS})
        if f.pop("load_format") not in (None, "auto", "safetensors"):
            raise RequestError("load_format must be null, 'auto' or 'safetensors'")
        if not f.pop("apply"):
            raise RequestError("'apply': false is only for update_weights_from_distributed "
                               "and update_weights_from_tensor")
        response = await _run(lambda: engine.update_weights_from_disk(**f))
        if response.status_code == 200:
            args.model_path = f["model_path"]  # /model_info reports what is loaded
        return response

    async def get_weights_by_name(request: Request) -> JSONResponse:
        if request.method == "GET":
            f = _parse(dict(request.query_params), {"name": Field(str),
                                                    "truncate_size": Field(str, "100")})
            f["truncate_size"] = _as_int(f["truncate_size"], "truncate_size")
        else:
            f = await fields(request, {"name": Field(str), "truncate_size": Field(int, 100)})
        try:
            values = await asyncio.to_thread(engine.get_weights_by_name, **f)
        except ValueError as exc:  # an unknown parameter name
            raise RequestError(str(exc)) from exc
        return JSONResponse(values)

    app.add_api_route("/get_weights_by_name", get_weights_by_name, methods=["GET", "POST"])

    @app.get("/get_weights_metadata")
    async def get_weights_metadata() -> JSONResponse:
        def read() -> dict[str, Any]:  # calls into the engine: never on the event loop
            return {**engine.weights_metadata(), "weight_version": engine.weight_version}

        return JSONResponse(await asyncio.to_thread(read))

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> JSONResponse:
        f = await fields(request, {"mode": Field(str, "abort")})
        return await _run(lambda: engine.pause_generation(**f),
                          f"generation paused (mode={f['mode']})")

    @app.post("/continue_generation")
    async def continue_generation(request: Request) -> JSONResponse:
        await fields(request, {})
        return await _run(engine.continue_generation, "generation continued")


async def _run(call: Callable[[], str | None], message: str | None = None) -> JSONResponse:
    """Run a blocking engine call on a worker thread; any failure is SGLang's 400 answer."""
    try:
        result = await asyncio.to_thread(call)
    except ValueError as exc:
        return _failure(str(exc))
    except Exception as exc:  # e.g. a broken broadcast: the engine itself keeps serving
        logger.exception("weight endpoint failed")
        return _failure(f"{type(exc).__name__}: {exc}")
    return JSONResponse({"success": True, "message": message or result})


def _failure(message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message, "error": {
        "message": message, "type": "invalid_request_error", "code": 400}}, status_code=400)


def _parse(body: Any, spec: dict[str, Field]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    reject_unknown_fields(body, set(spec) | _NO_OPS)
    out = {}
    for name, field in spec.items():
        value = body.get(name)
        if value is None:
            if field.default is _REQUIRED:
                raise RequestError(f"missing required field {name!r}")
            value = field.default
        elif not isinstance(value, field.kind) or (field.kind is int and isinstance(value, bool)):
            raise RequestError(f"{name!r} has the wrong type ({type(value).__name__})")
        out[name] = value
    return out


def _as_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RequestError(f"{name!r} must be an integer") from None


def _has_body(request: Request) -> bool:
    return (request.headers.get("content-length", "0") != "0"
            or "transfer-encoding" in request.headers)
