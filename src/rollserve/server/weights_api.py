"""SGLang's weight-update and pause endpoints over one engine.

Answers are SGLang's `{"success": bool, "message": str}`; a refused call is HTTP 400 whose body
also carries this server's usual `{"error": {"message": ...}}`. Every blocking engine call runs
on a worker thread: joining a group waits for all ranks and an update waits for the engine to
drain, while `/health` and `/generate` keep being served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, ClassVar, TypeVar

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import model_validator

from rollserve.engine.api import EngineAPI
from rollserve.server.bodies import JsonBody, QueryParams, RequestBody, invalid
from rollserve.server.errors import RequestError
from rollserve.server.state import State
from rollserve.weights.updater import DEFAULT_GROUP, FLATTENED_BUCKET

logger = logging.getLogger(__name__)

router = APIRouter()


class WeightsRequest(RequestBody):
    """A body of these endpoints: may be absent (an empty object); unknown fields are refused;
    null means the field's default, as SGLang's clients send every optional field."""

    REJECT_UNKNOWN: ClassVar[bool] = True
    # SGLang request fields that change nothing here: accepted with any value.
    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"rid", "torch_empty_cache", "token_step", "disable_draft_model"})

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


W = TypeVar("W", bound=WeightsRequest)


def _body(model: type[W]) -> Any:
    return Depends(JsonBody(model, optional=True))


class InitGroupRequest(WeightsRequest):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP
    backend: str | None = None  # default: nccl on CUDA, gloo on CPU


class GroupRequest(WeightsRequest):
    group_name: str = DEFAULT_GROUP


class UpdateRequest(WeightsRequest):
    """What every weight update takes."""

    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    apply: bool = True

    def update_options(self) -> dict[str, Any]:
        """The options every engine update call takes (`apply` is not one of them)."""
        return {"flush_cache": self.flush_cache, "abort_all_requests": self.abort_all_requests,
                "weight_version": self.weight_version}


class FromDistributedRequest(UpdateRequest):
    names: list[Any]
    dtypes: list[Any]
    shapes: list[Any]
    group_name: str = DEFAULT_GROUP
    load_format: str | None = None


class FromTensorRequest(UpdateRequest):
    serialized_named_tensors: list[Any]
    load_format: str | None = None

    @model_validator(mode="after")
    def _one_payload_per_rank(self) -> FromTensorRequest:
        if self.load_format not in (None, "direct", FLATTENED_BUCKET):
            raise invalid(f"load_format must be null, 'direct' or {FLATTENED_BUCKET!r}")
        payloads = self.serialized_named_tensors
        if not payloads or not all(isinstance(p, str) for p in payloads):
            raise invalid("'serialized_named_tensors' must hold one base64 string per "
                          "tensor-parallel rank")
        return self


class FromDiskRequest(UpdateRequest):
    model_path: str
    load_format: str | None = None

    @model_validator(mode="after")
    def _a_checkpoint_applied_at_once(self) -> FromDiskRequest:
        if self.load_format not in (None, "auto", "safetensors"):
            raise invalid("load_format must be null, 'auto' or 'safetensors'")
        if not self.apply:
            raise invalid("'apply': false is only for update_weights_from_distributed "
                          "and update_weights_from_tensor")
        return self


class WeightsByNameRequest(WeightsRequest):
    name: str
    truncate_size: int = 100


class PauseRequest(WeightsRequest):
    mode: str = "abort"


class ContinueRequest(WeightsRequest):
    """No fields: anything set but SGLang's no-ops is refused."""


@router.post("/init_weights_update_group")
async def init_weights_update_group(
        state: State, body: Annotated[InitGroupRequest, _body(InitGroupRequest)]
) -> JSONResponse:
    engine = state.engine
    backend = body.backend or ("nccl" if engine.device.type == "cuda" else "gloo")
    join = partial(engine.init_weights_update_group, master_address=body.master_address,
                   master_port=body.master_port, rank_offset=body.rank_offset,
                   world_size=body.world_size, group_name=body.group_name, backend=backend)
    return await _run(join, f"joined weights update group {body.group_name!r} as rank "
                            f"{body.rank_offset} of {body.world_size}")


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(
        state: State, body: Annotated[GroupRequest, _body(GroupRequest)]) -> JSONResponse:
    return await _run(partial(state.engine.destroy_weights_update_group,
                              group_name=body.group_name),
                      f"left weights update group {body.group_name!r}")


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(
        state: State, body: Annotated[FromDistributedRequest, _body(FromDistributedRequest)]
) -> JSONResponse:
    return await _run(partial(
        state.engine.update_weights_from_distributed, names=body.names, dtypes=body.dtypes,
        shapes=body.shapes, group_name=body.group_name, load_format=body.load_format,
        apply=body.apply, **body.update_options()))


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(
        state: State, body: Annotated[FromTensorRequest, _body(FromTensorRequest)]
) -> JSONResponse:
    # SGLang sends one payload per TP rank (the same tensors, each where its rank can open
    # them); each rank reads its own. One payload for all ranks is accepted too.
    return await _run(partial(
        state.engine.update_weights_from_serialized, payload=body.serialized_named_tensors,
        load_format=body.load_format, apply=body.apply, **body.update_options()))


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(
        state: State, body: Annotated[FromDiskRequest, _body(FromDiskRequest)]
) -> JSONResponse:
    response = await _run(partial(state.engine.update_weights_from_disk,
                                  model_path=body.model_path, **body.update_options()))
    if response.status_code == 200:
        state.args.model_path = body.model_path  # /model_info reports what is loaded
    return response


@router.get("/get_weights_by_name")
async def get_weights_by_name(
        state: State,
        query: Annotated[WeightsByNameRequest, Depends(QueryParams(WeightsByNameRequest))]
) -> JSONResponse:
    return await _weights_by_name(state.engine, query)


@router.post("/get_weights_by_name")
async def post_weights_by_name(
        state: State, body: Annotated[WeightsByNameRequest, _body(WeightsByNameRequest)]
) -> JSONResponse:
    return await _weights_by_name(state.engine, body)


async def _weights_by_name(engine: EngineAPI, request: WeightsByNameRequest) -> JSONResponse:
    try:
        values = await asyncio.to_thread(engine.get_weights_by_name, name=request.name,
                                         truncate_size=request.truncate_size)
    except ValueError as exc:  # an unknown parameter name
        raise RequestError(str(exc)) from exc
    return JSONResponse(values)


@router.get("/get_weights_metadata")
async def get_weights_metadata(state: State) -> JSONResponse:
    # Calls into the engine: never on the event loop.
    return JSONResponse(await asyncio.to_thread(_weights_metadata, state.engine))


def _weights_metadata(engine: EngineAPI) -> dict[str, Any]:
    return {**engine.weights_metadata(), "weight_version": engine.weight_version}


@router.post("/pause_generation")
async def pause_generation(
        state: State, body: Annotated[PauseRequest, _body(PauseRequest)]) -> JSONResponse:
    return await _run(partial(state.engine.pause_generation, mode=body.mode),
                      f"generation paused (mode={body.mode})")


@router.post("/continue_generation", dependencies=[_body(ContinueRequest)])
async def continue_generation(state: State) -> JSONResponse:
    return await _run(state.engine.continue_generation, "generation continued")


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
