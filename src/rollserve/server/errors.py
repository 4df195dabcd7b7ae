"""Client errors as SGLang/OpenAI-style JSON bodies: {"error": {"message": ...}}."""

from __future__ import annotations

from fastapi import Request
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


async def request_error_handler(_request: Request, exc: RequestError) -> JSONResponse:
    """The app's handler for RequestError, raised by handlers and the validation layer."""
    return error_response(str(exc), exc.status)
