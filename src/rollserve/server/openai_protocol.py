"""The OpenAI API's shapes: chat and completion request models, and the pieces of their
responses (finish reasons, logprobs, usage)."""

from __future__ import annotations

import reprlib
import time
import uuid
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from rollserve.engine.sampling_params import OPENAI_SAMPLING_FIELDS, to_sglang_names
from rollserve.server.bodies import Invalid, RequestBody, invalid
from rollserve.server.errors import RequestError

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class OpenAIRequest(RequestBody):
    """What chat and completions share. Sampling parameters (OpenAI's names and SGLang's
    extras) are kept as extra fields and checked by the engine's SamplingParams, so that
    their errors name the parameter as SGLang does."""

    model_config = ConfigDict(extra="allow")
    REJECT_UNKNOWN: ClassVar[bool] = True
    # Accepted whatever their value: none of them changes what is generated. Features that
    # would (tools, response_format, logit_bias, echo, ...) are refused when set, never
    # ignored. sglang-router sends separate_reasoning and stream_reasoning with SGLang's
    # defaults (true); they only matter with a reasoning parser, which this server does not
    # have, as SGLang without --reasoning-parser.
    IGNORED: ClassVar[frozenset[str]] = frozenset({
        "user", "store", "metadata", "service_tier", "parallel_tool_calls",
        "separate_reasoning", "stream_reasoning"})

    model: str | None = None
    stream: Annotated[bool | None, Invalid("'stream' must be a boolean")] = None
    stream_options: Annotated[dict[str, Any] | None,
                              Invalid("'stream_options' must be an object")] = None
    # As on /generate: one per prompt, for /abort_request.
    rid: Annotated[str | list[str] | None, Invalid(
        "'rid' must be a string, or a list of strings with one per prompt")] = None

    @classmethod
    def accepted_fields(cls) -> set[str]:
        return {*super().accepted_fields(), *OPENAI_SAMPLING_FIELDS}

    @property
    def prompt_count(self) -> int:
        return 1

    @model_validator(mode="after")
    def _one_rid_per_prompt(self) -> OpenAIRequest:
        if isinstance(self.rid, list) and len(self.rid) != self.prompt_count:
            raise invalid("'rid' must be a string, or a list of strings with one per prompt")
        return self

    def sampling(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """SGLang sampling parameters: the request's over `defaults`; null means unset."""
        given = {k: v for k, v in (self.model_extra or {}).items()
                 if k in OPENAI_SAMPLING_FIELDS and v is not None}
        return {**defaults, **to_sglang_names(given)}

    def rids(self) -> list[str] | None:
        return [self.rid] if isinstance(self.rid, str) else self.rid

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(OpenAIRequest):
    messages: Annotated[list[Any], Field(min_length=1),
                        Invalid("'messages' must be a non-empty list")]
    logprobs: Annotated[bool | None, Invalid("'logprobs' must be a boolean")] = None
    top_logprobs: Annotated[TopLogprobs | None, Invalid(
        f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]")] = None
    chat_template_kwargs: Annotated[dict[str, Any] | None,
                                    Invalid("'chat_template_kwargs' must be an object")] = None

    @field_validator("messages")
    @classmethod
    def _text_messages(cls, messages: list[Any]) -> list[Any]:
        return [_message(i, m) for i, m in enumerate(messages)]

    @property
    def want_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def top_logprobs_num(self) -> int:
        return self.top_logprobs or 0

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None
                   ) -> list[list[int]]:
        try:
            text = tokenizer.apply_chat_template(
                self.messages, chat_template=chat_template, add_generation_prompt=True,
                tokenize=False, **(self.chat_template_kwargs or {}),
            )
        except Exception as exc:  # a template error is the request's fault (bad message shape)
            raise RequestError(
                f"cannot apply the chat template to these messages: {exc}") from exc
        return [tokenizer.encode(text, add_special_tokens=False)]

    def sampling(self, defaults: dict[str, Any]) -> dict[str, Any]:
        # No max_tokens: generate until a stop or the context length, as SGLang and OpenAI do.
        return super().sampling({"max_new_tokens": None, **defaults})


def _message(index: int, message: Any) -> Any:
    """Checks the role; content given as a list of text parts (the openai client's typed
    form) is joined into one string, as SGLang does, so string-only templates accept it."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
        raise invalid(f"messages[{index}] has an unknown role {reprlib.repr(role)}; "
                      f"valid roles: {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    if not all(isinstance(p, dict) and p.get("type") == "text"
               and isinstance(p.get("text"), str) for p in content):
        raise invalid(f"messages[{index}].content parts must all be "
                      "{'type': 'text', 'text': ...} (this server reads text only)")
    return {**message, "content": "".join(p["text"] for p in content)}


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[
        str | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[list[int]], Field(min_length=1)],
        Invalid("'prompt' must be a string, a list of strings or token ids")]
    # Completions' logprobs: the number of top logprobs per token.
    logprobs: Annotated[TopLogprobs | None, Invalid(
        f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]")] = None

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def top_logprobs_num(self) -> int:
        return self.logprobs or 0

    @property
    def prompt_count(self) -> int:
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return 1 if one else len(self.prompt)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [tokenizer.encode(prompt)]
        if isinstance(prompt[0], str):
            return [tokenizer.encode(p) for p in prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [list(p) for p in prompt]

    def sampling(self, defaults: dict[str, Any]) -> dict[str, Any]:
        return super().sampling({"max_new_tokens": 16, **defaults})  # OpenAI's default


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
