"""OpenAI-compatible request parsing and response framing (chat and completions)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from rollserve.server.errors import RequestError, reject_unknown_fields

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# OpenAI name -> SGLang sampling parameter; SGLang's own extras pass through unchanged.
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
           "seed": "sampling_seed", "min_tokens": "min_new_tokens"}
PASSED_THROUGH = {"temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                  "presence_penalty", "repetition_penalty", "stop", "stop_token_ids",
                  "ignore_eos", "skip_special_tokens", "no_stop_trim", "n"}
# Accepted whatever their value: none of them changes what is generated. Features that
# would (tools, response_format, logit_bias, echo, ...) are refused when set, never ignored.
ACCEPTED = {"model", "stream", "stream_options", "logprobs", "top_logprobs", "user",
            "messages", "prompt", "store", "metadata", "chat_template_kwargs", "service_tier",
            "parallel_tool_calls", "rid",
            # sglang-router sends SGLang's defaults (true); they only matter with a reasoning
            # parser, which this server does not have, as SGLang without --reasoning-parser.
            "separate_reasoning", "stream_reasoning"}


@dataclass(slots=True)
class OpenAIRequest:
    model: str
    prompt_ids: list[list[int]]
    sampling: dict[str, Any]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    rid: list[str] | None  # as on /generate: one per prompt, for /abort_request


def parse_chat(body: Any, tokenizer: PreTrainedTokenizerBase, chat_template: str | None,
               defaults: dict[str, Any]) -> OpenAIRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    messages = [_message(i, m) for i, m in enumerate(messages)]
    try:
        ids = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=True, tokenize=False,
            **(body.get("chat_template_kwargs") or {}),
        )
    except Exception as exc:  # a template error is the request's fault (bad message shape)
        raise RequestError(f"cannot apply the chat template to these messages: {exc}") from exc
    prompt = tokenizer.encode(ids, add_special_tokens=False)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be a boolean")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise RequestError(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    # No max_tokens: generate until a stop or the context length, as SGLang and OpenAI do.
    return _request(body, [prompt], {"max_new_tokens": None, **defaults}, bool(logprobs),
                    top or 0)


def _message(index: int, message: Any) -> Any:
    """Checks the role; content given as a list of text parts (the openai client's typed
    form) is joined into one string, as SGLang does, so string-only templates accept it."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
        raise RequestError(
            f"messages[{index}] has an unknown role {role!r}; valid roles: {', '.join(ROLES)}"
        )
    content = message.get("content")
    if not isinstance(content, list):
        return message
    if not all(isinstance(p, dict) and p.get("type") == "text"
               and isinstance(p.get("text"), str) for p in content):
        raise RequestError(f"messages[{index}].content parts must all be "
                           "{'type': 'text', 'text': ...} (this server reads text only)")
    return {**message, "content": "".join(p["text"] for p in content)}


def parse_completion(body: Any, tokenizer: PreTrainedTokenizerBase,
                     defaults: dict[str, Any]) -> OpenAIRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise RequestError("'prompt' must be a string, a list of strings or token ids")
    logprobs = body.get("logprobs")  # completions: the number of top logprobs per token
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise RequestError(f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    return _request(body, prompts, {"max_new_tokens": 16, **defaults}, logprobs is not None,
                    logprobs or 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    reject_unknown_fields(body, ACCEPTED | set(RENAMED) | PASSED_THROUGH)
    if body.get("stream") not in (None, True, False):
        raise RequestError("'stream' must be a boolean")
    return body


def _request(body: dict[str, Any], prompts: list[list[int]], defaults: dict[str, Any],
             logprobs: bool, top_logprobs: int) -> OpenAIRequest:
    sampling = dict(defaults)
    for key, value in body.items():
        if value is None:
            continue
        if key in RENAMED:
            sampling[RENAMED[key]] = value
        elif key in PASSED_THROUGH:
            sampling[key] = value
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object")
    rid = body.get("rid")
    rid = [rid] if isinstance(rid, str) else rid
    if rid is not None and not (isinstance(rid, list) and len(rid) == len(prompts)
                                and all(isinstance(r, str) for r in rid)):
        raise RequestError("'rid' must be a string, or a list of strings with one per prompt")
    return OpenAIRequest(
        model=str(body.get("model") or ""), prompt_ids=prompts, sampling=sampling,
        stream=bool(body.get("stream")), include_usage=bool(options.get("include_usage")),
        logprobs=logprobs, top_logprobs=top_logprobs, rid=rid,
    )


def finish_reason(output: dict[str, Any]) -> str | None:
    reason = output["meta_info"]["finish_reason"]
    if reason is None:
        return None
    return {"length": "length", "stop": "stop"}.get(reason["type"], "abort")


def matched_stop(output: dict[str, Any]) -> Any:
    reason = output["meta_info"]["finish_reason"]
    return reason.get("matched") if reason and reason["type"] == "stop" else None


def chat_logprobs(output: dict[str, Any], start: int) -> dict[str, Any]:
    """OpenAI chat `logprobs` for output tokens from `start` on."""
    meta = output["meta_info"]
    tops = meta.get("output_top_logprobs") or []
    content = []
    for i, (logprob, _tid, text) in enumerate(meta["output_token_logprobs"][start:], start):
        content.append({
            "token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for lp, _id, t in (tops[i] if i < len(tops) else [])],
        })
    return {"content": content}


def completion_logprobs(output: dict[str, Any], start: int = 0) -> dict[str, Any]:
    """OpenAI completions `logprobs` for output tokens from `start` on."""
    meta = output["meta_info"]
    tops = (meta.get("output_top_logprobs") or [])[start:]
    triples = meta["output_token_logprobs"][start:]
    return {
        "tokens": [t for _, _, t in triples],
        "token_logprobs": [lp for lp, _, _ in triples],
        "top_logprobs": [{t: lp for lp, _, t in top} for top in tops] or None,
        "text_offset": None,
    }


def usage(outputs: list[dict[str, Any]], prompt_count: int, n: int) -> dict[str, int]:
    prompt = sum(outputs[i * n]["meta_info"]["prompt_tokens"] for i in range(prompt_count))
    completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    cached = sum(outputs[i * n]["meta_info"]["cached_tokens"] for i in range(prompt_count))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
