"""The OpenAI API's routes: `/v1/models`, `/v1/chat/completions` and `/v1/completions`,
each with streaming (request models and response pieces: openai_protocol)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from rollserve.engine.api import EngineAPI
from rollserve.engine.validation import GenerateInput
from rollserve.server import openai_protocol as protocol
from rollserve.server.bodies import JsonBody
from rollserve.server.errors import error_response
from rollserve.server.generation import SSE_DONE, collect, event_stream, prepare, sse, updates
from rollserve.server.openai_protocol import ChatRequest, CompletionRequest
from rollserve.server.state import ServerState, State

router = APIRouter()

AnyRequest = ChatRequest | CompletionRequest


@router.get("/v1/models")
async def models(state: State) -> JSONResponse:
    args = state.args
    return JSONResponse({"object": "list", "data": [{
        "id": args.model_name, "object": "model", "created": int(state.started),
        "owned_by": "rollserve", "root": args.model_path,
        "max_model_len": state.engine.context_len,
    }]})


@router.post("/v1/chat/completions")
async def chat(request: Request, state: State,
               body: Annotated[ChatRequest, Depends(JsonBody(ChatRequest))]) -> Response:
    prompts = body.prompt_ids(state.engine.tokenizer, state.chat_template)
    return await _respond(request, state, body, prompts)


@router.post("/v1/completions")
async def completions(request: Request, state: State,
                      body: Annotated[CompletionRequest, Depends(JsonBody(CompletionRequest))]
                      ) -> Response:
    return await _respond(request, state, body, body.prompt_ids(state.engine.tokenizer))


async def _respond(request: Request, state: ServerState, body: AnyRequest,
                   prompts: list[list[int]]) -> Response:
    engine, chat = state.engine, isinstance(body, ChatRequest)
    _, inputs = prepare(
        engine, None, body.sampling(state.sampling_defaults), prompts,
        return_logprob=body.want_logprobs, top_logprobs_num=body.top_logprobs_num,
        return_text_in_logprobs=True, rid=body.rids(),
    )
    n = len(inputs) // len(prompts)
    model = body.model or state.args.model_name
    if body.stream:
        frames = (_stream_chat if chat else _stream_completion)(
            request, engine, inputs, body, model, n)
        return event_stream(request, frames)
    outputs = await collect(request, engine, inputs)
    if outputs is None:
        return error_response("client disconnected", 499)
    make_choice = _chat_choice if chat else _completion_choice
    return JSONResponse({
        "id": protocol.new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": protocol.now(), "model": model,
        "choices": [make_choice(i, o, body.want_logprobs) for i, o in enumerate(outputs)],
        "usage": protocol.usage(outputs, len(prompts), n),
    })


def _chat_choice(index: int, output: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    return {
        "index": index, "message": {"role": "assistant", "content": output["text"]},
        "logprobs": protocol.chat_logprobs(output, 0) if logprobs else None,
        "finish_reason": protocol.finish_reason(output),
        "matched_stop": protocol.matched_stop(output),
    }


def _completion_choice(index: int, output: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    return {
        "index": index, "text": output["text"],
        "logprobs": protocol.completion_logprobs(output) if logprobs else None,
        "finish_reason": protocol.finish_reason(output),
        "matched_stop": protocol.matched_stop(output),
    }


async def _stream_chat(request: Request, engine: EngineAPI, inputs: list[GenerateInput],
                       body: AnyRequest, model: str, n: int) -> AsyncIterator[bytes]:
    chunk_id, created = protocol.new_id("chatcmpl"), protocol.now()

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices, **extra})

    for i in range(len(inputs)):
        yield frame([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    sent_text, sent_tokens = [0] * len(inputs), [0] * len(inputs)
    finals: list[dict[str, Any]] = [{} for _ in inputs]
    async for index, output, finished in updates(request, engine, inputs, stream=True):
        text = output["text"]
        delta = text[sent_text[index]:]
        logprobs = (protocol.chat_logprobs(output, sent_tokens[index])
                    if body.want_logprobs else None)
        sent_text[index], sent_tokens[index] = len(text), len(output["output_ids"])
        if delta or finished or (logprobs and logprobs["content"]):
            choice = {"index": index, "delta": {"content": delta} if delta else {},
                      "logprobs": logprobs, "finish_reason": None}
            if finished:
                choice["finish_reason"] = protocol.finish_reason(output)
                choice["matched_stop"] = protocol.matched_stop(output)
            yield frame([choice])
        if finished:
            finals[index] = output
    if body.include_usage and all(finals):
        yield frame([], usage=protocol.usage(finals, body.prompt_count, n))
    yield SSE_DONE


async def _stream_completion(request: Request, engine: EngineAPI, inputs: list[GenerateInput],
                             body: AnyRequest, model: str, n: int) -> AsyncIterator[bytes]:
    chunk_id, created = protocol.new_id("cmpl"), protocol.now()
    sent_text, sent_tokens = [0] * len(inputs), [0] * len(inputs)
    finals: list[dict[str, Any]] = [{} for _ in inputs]
    base = {"id": chunk_id, "object": "text_completion", "created": created, "model": model}
    async for index, output, finished in updates(request, engine, inputs, stream=True):
        delta = output["text"][sent_text[index]:]
        logprobs = (protocol.completion_logprobs(output, sent_tokens[index])
                    if body.want_logprobs else None)
        sent_text[index], sent_tokens[index] = len(output["text"]), len(output["output_ids"])
        if delta or finished or (logprobs and logprobs["tokens"]):
            yield sse({**base, "choices": [{
                "index": index, "text": delta, "logprobs": logprobs,
                "finish_reason": protocol.finish_reason(output) if finished else None}]})
        if finished:
            finals[index] = output
    if body.include_usage and all(finals):
        yield sse({**base, "choices": [],
                   "usage": protocol.usage(finals, body.prompt_count, n)})
    yield SSE_DONE
