"""SGLang's native API: `/generate` (+ streaming), `/tokenize`, `/detokenize`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import model_validator

from rollserve.engine.api import EngineAPI
from rollserve.engine.sampling_params import SAMPLING_FIELDS
from rollserve.engine.validation import GenerateInput
from rollserve.server.bodies import Invalid, JsonBody, RequestBody, invalid
from rollserve.server.errors import RequestError, error_response
from rollserve.server.generation import SSE_DONE, collect, event_stream, prepare, sse, updates
from rollserve.server.state import State

router = APIRouter()


class GenerateRequest(RequestBody):
    """SGLang's GenerateReqInput, the fields this server supports. The prompt, sampling and
    logprob fields are checked by the engine's own validation (Engine.prepare), which the
    in-process API shares; this model checks what only the HTTP layer reads."""

    REJECT_UNKNOWN: ClassVar[bool] = True
    # Added by sglang-router; neither changes what is generated: one model per server, and
    # metrics are always counted.
    IGNORED: ClassVar[frozenset[str]] = frozenset({"model", "log_metrics"})

    text: Any = None
    input_ids: Any = None
    sampling_params: Any = None
    return_logprob: Annotated[bool, Invalid("'return_logprob' must be a boolean")] = False
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    return_text_in_logprobs: Annotated[
        bool, Invalid("'return_text_in_logprobs' must be a boolean")] = False
    stream: Annotated[bool, Invalid("'stream' must be a boolean")] = False
    rid: Any = None

    @classmethod
    def check_fields(cls, data: dict[str, Any]) -> None:
        # Before the unknown-field check: TorchRL-style clients put sampling parameters at
        # the top level, where SGLang silently ignores them.
        misplaced = sorted(set(data) & SAMPLING_FIELDS)
        if misplaced:
            raise invalid(
                f"sampling parameter(s) {', '.join(misplaced)} must go inside "
                "'sampling_params', not at the top level"
            )
        super().check_fields(data)

    def engine_kwargs(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for Engine.prepare, the server's sampling defaults under the
        request's own."""
        return {
            "prompt": self.text,
            "input_ids": self.input_ids,
            "sampling_params": _with_defaults(self.sampling_params, defaults),
            "return_logprob": self.return_logprob,
            "logprob_start_len": -1 if self.logprob_start_len is None else self.logprob_start_len,
            "top_logprobs_num": 0 if self.top_logprobs_num is None else self.top_logprobs_num,
            "return_text_in_logprobs": self.return_text_in_logprobs,
            "rid": self.rid,
        }


def _with_defaults(sampling: Any, defaults: dict[str, Any]) -> Any:
    """Anything but a dict, a list of them or None is left for the engine to refuse."""
    if isinstance(sampling, dict):
        return {**defaults, **sampling}
    if isinstance(sampling, list):
        return [{**defaults, **s} if isinstance(s, dict) else s for s in sampling]
    return dict(defaults) if sampling is None else sampling


class TokenizeRequest(RequestBody):
    """`prompt` (or SGLang's older `text`); other fields are ignored, as SGLang does."""

    prompt: Annotated[str | list[str], Invalid("'prompt' must be a string or a list of strings")]
    add_special_tokens: Annotated[bool, Invalid("'add_special_tokens' must be a boolean")] = True

    @model_validator(mode="before")
    @classmethod
    def _text_for_prompt(cls, data: Any) -> Any:
        # `text` stands in for a `prompt` that is absent, not for one that is null.
        if isinstance(data, dict) and "prompt" not in data and "text" in data:
            return {**data, "prompt": data["text"]}
        return data


class DetokenizeRequest(RequestBody):
    tokens: Annotated[list[int], Invalid("'tokens' must be a list of token ids")]


@router.post("/generate")
async def generate(request: Request, state: State,
                   body: Annotated[GenerateRequest, Depends(JsonBody(GenerateRequest))]
                   ) -> Response:
    engine = state.engine
    batched, inputs = prepare(engine, **body.engine_kwargs(state.sampling_defaults))
    single = not batched and len(inputs) == 1
    if body.stream:
        return event_stream(request, _stream(request, engine, inputs, single))
    outputs = await collect(request, engine, inputs)
    if outputs is None:
        return error_response("client disconnected", 499)
    return JSONResponse(outputs[0] if single else outputs)


async def _stream(request: Request, engine: EngineAPI, inputs: list[GenerateInput],
                  single: bool) -> AsyncIterator[bytes]:
    async for index, output, _finished in updates(request, engine, inputs, stream=True):
        yield sse(output if single else {**output, "index": index})
    yield SSE_DONE


@router.post("/tokenize")
async def tokenize(state: State,
                   body: Annotated[TokenizeRequest, Depends(JsonBody(TokenizeRequest))]
                   ) -> JSONResponse:
    tokenizer = state.engine.tokenizer
    count: int | list[int]
    if isinstance(body.prompt, str):
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        count = len(ids)
    else:
        ids = [tokenizer.encode(p, add_special_tokens=body.add_special_tokens)
               for p in body.prompt]
        count = [len(i) for i in ids]
    return JSONResponse({"tokens": ids, "count": count,
                         "max_model_len": state.engine.context_len})


@router.post("/detokenize")
async def detokenize(state: State,
                     body: Annotated[DetokenizeRequest, Depends(JsonBody(DetokenizeRequest))]
                     ) -> JSONResponse:
    vocab = state.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise RequestError(f"'tokens' has ids outside the vocabulary [0, {vocab})")
    return JSONResponse({"text": state.engine.tokenizer.decode(body.tokens)})
