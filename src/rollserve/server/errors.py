"""Client errors as SGLang/OpenAI-style JSON bodies: {"error": {"message": ...}}."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class RequestError(ValueError):
    """A bad request: answered with `status` (400 unless said otherwise), never fatal."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_response(message: str, status: int) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "internal_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


def reject_unknown_fields(body: dict[str, Any], known: set[str]) -> None:
    """Unknown fields are errors when set. Unknown fields left empty (null, false, [], {})
    pass: SGLang clients and sglang-router send SGLang's optional fields that way, and an
    empty option asks for nothing this server lacks."""
    used = sorted(k for k in set(body) - known if body[k] not in (None, False, [], {}, ""))
    if used:
        raise RequestError(f"unknown or unsupported field(s): {', '.join(used)}")
