"""The request validation layer: every request body (and the one query string an endpoint
reads) becomes a Pydantic model here, and every failure a RequestError, answered 4xx with
`{"error": {"message": ...}}`.

A model's field answers a failed validation with its `Invalid` message when it has one (the
API's established wording), else "missing required field 'x'" or "'x' has the wrong type
(T)". Validators raise `invalid(message)` for checks of their own. Types are strict: JSON
has no bool that is an int, nor a number that is a string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from rollserve.server.errors import RequestError
from rollserve.server.state import server_state

NOT_AN_OBJECT = "the request body must be a JSON object"
_INVALID = "invalid_request"  # the error type of invalid(): its message is the answer


@dataclass(frozen=True, slots=True)
class Invalid:
    """Field metadata (`Annotated[T, Invalid("...")]`): the message any failed validation
    of the field answers with."""

    message: str


def invalid(message: str) -> PydanticCustomError:
    """An error for a validator to raise: `message` is answered as it is."""
    return PydanticCustomError(_INVALID, message)


class RequestBody(BaseModel):
    """A JSON object. Fields in `IGNORED` are accepted with any value and never read. Other
    unknown fields are dropped, or, with `REJECT_UNKNOWN`, refused when set (see
    reject_unknown_fields): endpoints that generate or change the engine refuse what they
    would otherwise silently ignore."""

    model_config = ConfigDict(strict=True, extra="ignore")
    IGNORED: ClassVar[frozenset[str]] = frozenset()
    REJECT_UNKNOWN: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.REJECT_UNKNOWN:
            cls.check_fields(data)
        return data

    @classmethod
    def check_fields(cls, data: dict[str, Any]) -> None:
        """Refuses unknown fields; runs before any field is validated."""
        reject_unknown_fields(data, cls.accepted_fields())

    @classmethod
    def accepted_fields(cls) -> set[str]:
        return set(cls.model_fields) | cls.IGNORED


def reject_unknown_fields(body: dict[str, Any], known: Iterable[str]) -> None:
    """Unknown fields are errors when set. Unknown fields left empty (null, false, [], {})
    pass: SGLang clients and sglang-router send SGLang's optional fields that way, and an
    empty option asks for nothing this server lacks."""
    used = sorted(k for k in set(body) - set(known) if body[k] not in (None, False, [], {}, ""))
    if used:
        raise invalid(f"unknown or unsupported field(s): {', '.join(used)}")


M = TypeVar("M", bound=RequestBody)


def validate(model: type[M], data: Any, *, strict: bool = True) -> M:
    """`data` as a `model`, or RequestError naming the first problem. `strict=False` lets
    numbers come as strings (query parameters)."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise RequestError(_message(model, exc.errors(include_url=False))) from None


def _message(model: type[RequestBody], errors: list[ErrorDetails]) -> str:
    error = errors[0]
    loc = error["loc"]
    if error["type"] == _INVALID:
        return error["msg"]
    if not loc:
        return NOT_AN_OBJECT
    name = str(loc[0])
    field = model.model_fields.get(name)
    marker = next((m for m in field.metadata if isinstance(m, Invalid)), None) if field else None
    if marker is not None:
        return marker.message
    if error["type"] == "missing":
        return f"missing required field {name!r}"
    if error["type"] == "int_parsing":
        return f"{name!r} must be an integer"
    return f"{name!r} has the wrong type ({type(error['input']).__name__})"


class JsonBody(Generic[M]):
    """A FastAPI dependency: the request's JSON body as a `model`. With `optional`, an empty
    body is an empty object (SGLang's control endpoints are often called without one)."""

    def __init__(self, model: type[M], optional: bool = False) -> None:
        self.model, self.optional = model, optional

    async def __call__(self, request: Request) -> M:
        limit = server_state(request).args.max_request_bytes
        body = await read_body(request, limit)
        data = {} if self.optional and not body else parse_json(body)
        return validate(self.model, data)


class QueryParams(Generic[M]):
    """A FastAPI dependency: the query string as a `model` (values are strings: numbers are
    parsed)."""

    def __init__(self, model: type[M]) -> None:
        self.model = model

    async def __call__(self, request: Request) -> M:
        return validate(self.model, dict(request.query_params), strict=False)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes as it streams in (a chunked body has no
    Content-Length for GuardMiddleware to check)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"request body exceeds the limit of {limit} bytes", 413)
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from exc
    except RecursionError:
        # The C decoder checks its depth against the interpreter's recursion limit and
        # unwinds cleanly; nothing legitimate nests this deep.
        raise RequestError("malformed JSON body: nested too deeply") from None
