"""Health, information and control routes: what sglang-router polls (health, server and
model info, load) and what operators call (cache flush, abort, metrics)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import model_validator

import rollserve
from rollserve.server.bodies import Invalid, JsonBody, RequestBody, invalid
from rollserve.server.errors import error_response
from rollserve.server.generation import collect
from rollserve.server.state import State

router = APIRouter()

ABORT_USAGE = "give 'rid' (a string) or 'abort_all': true"


class AbortRequest(RequestBody):
    """SGLang's AbortReq; other fields are ignored, as SGLang does."""

    rid: Annotated[str | None, Invalid(ABORT_USAGE)] = None
    abort_all: Annotated[bool, Invalid(ABORT_USAGE)] = False

    @model_validator(mode="after")
    def _names_what_to_abort(self) -> AbortRequest:
        if not self.abort_all and self.rid is None:
            raise invalid(ABORT_USAGE)
        return self


@router.get("/health")
async def health(state: State) -> Response:
    if not state.ready:
        return error_response("engine is warming up", 503)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request, state: State) -> Response:
    _, inputs = state.engine.prepare(None, {"max_new_tokens": 1, "temperature": 0.0}, [0])
    outputs = await collect(request, state.engine, inputs)
    if outputs is None or outputs[0]["meta_info"]["finish_reason"]["type"] == "abort":
        return error_response("engine failed to generate", 503)
    return Response(status_code=200)


# The get_ names are SGLang's older ones; sglang-router falls back to them.
@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(state: State) -> JSONResponse:
    args, engine = state.args, state.engine
    return JSONResponse({
        "model_path": args.model_path,
        "tokenizer_path": args.tokenizer_path or args.model_path,
        "is_generation": True, "weight_version": engine.weight_version,
        "architecture": engine.model_config.architecture,
        "max_context_length": engine.context_len,
    })


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(state: State) -> JSONResponse:
    args, engine = state.args, state.engine
    stats = engine.stats()
    return JSONResponse({
        **args.to_dict(), "tp_size": args.tp_size, "dp_size": 1,
        "version": rollserve.__version__, "weight_version": engine.weight_version,
        "max_total_num_tokens": stats["kv_pool_size"], "internal_states": [stats],
    })


@router.get("/get_load")
async def get_load(state: State) -> JSONResponse:
    # stats() waits for the engine thread, which may be busy for a while (a long step,
    # re-packing new weights): never on the event loop.
    stats = await asyncio.to_thread(state.engine.stats)
    return JSONResponse({
        "num_reqs": stats["num_running_reqs"] + stats["num_waiting_reqs"],
        "num_running_reqs": stats["num_running_reqs"],
        "num_waiting_reqs": stats["num_waiting_reqs"],
        "num_tokens": stats["kv_used_tokens"],
        "kv_usage": stats["kv_used_tokens"] / stats["kv_pool_size"],
    })


# A body, if any, is not read: there is nothing to ask (the router posts `{}`).
@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(state: State) -> JSONResponse:
    freed = await asyncio.to_thread(state.engine.flush_cache)
    return JSONResponse({"success": True, "freed_tokens": freed,
                         "message": "dropped every cache entry no running request uses"})


@router.post("/abort_request")
async def abort_request(state: State,
                        body: Annotated[AbortRequest, Depends(JsonBody(AbortRequest))]
                        ) -> JSONResponse:
    if body.abort_all:
        state.engine.abort_all()
    elif body.rid is not None:
        state.engine.abort(body.rid)
    return JSONResponse({"success": True})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    if state.metrics is None:
        return error_response("metrics are off; start the server with --enable-metrics", 404)
    body, content_type = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type=content_type)
