"""SGLang's native `/generate` request: parsing into engine inputs, and response framing."""

from __future__ import annotations

from typing import Any

from rollserve.engine.sampling_params import SamplingParams
from rollserve.server.errors import RequestError, reject_unknown_fields

GENERATE_FIELDS = {
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "stream", "rid",
    # Added by sglang-router; neither changes what is generated: one model per server, and
    # metrics are always counted.
    "model", "log_metrics",
}
SAMPLING_FIELDS = set(SamplingParams.__slots__)


def parse_generate(body: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for Engine.prepare, plus `stream`; raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _reject_unknown(body)
    sampling = body.get("sampling_params")
    if isinstance(sampling, dict):
        sampling = {**defaults, **sampling}
    elif isinstance(sampling, list):
        sampling = [{**defaults, **s} if isinstance(s, dict) else s for s in sampling]
    elif sampling is None:
        sampling = dict(defaults)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean")
    for flag in ("return_logprob", "return_text_in_logprobs"):
        if not isinstance(body.get(flag, False), bool):
            raise RequestError(f"{flag!r} must be a boolean")
    return {
        "prompt": body.get("text"),
        "input_ids": body.get("input_ids"),
        "sampling_params": sampling,
        "return_logprob": body.get("return_logprob", False),
        "logprob_start_len": _int_or(body.get("logprob_start_len"), -1),
        "top_logprobs_num": _int_or(body.get("top_logprobs_num"), 0),
        "return_text_in_logprobs": body.get("return_text_in_logprobs", False),
        "rid": body.get("rid"),
        "stream": stream,
    }


def _reject_unknown(body: dict[str, Any]) -> None:
    misplaced = sorted(set(body) & SAMPLING_FIELDS)
    if misplaced:
        raise RequestError(
            f"sampling parameter(s) {', '.join(misplaced)} must go inside 'sampling_params', "
            "not at the top level"
        )
    reject_unknown_fields(body, GENERATE_FIELDS)


def _int_or(value: Any, default: int) -> Any:
    return default if value is None else value
