"""Turns a generate call (single or batched, text or token ids, n samples) into validated,
normalised inputs. Every problem raises ValueError naming the field."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from rollserve.engine.request import LogprobRequest
from rollserve.engine.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class RequestLimits:
    vocab_size: int
    context_len: int
    pool_size: int


@dataclass(slots=True)
class GenerateInput:
    """One request as the scheduler will see it."""

    input_ids: list[int]
    sampling: SamplingParams
    rid: str
    logprob: LogprobRequest | None
    text_in_logprobs: bool
    leader_index: int | None  # index (in the same call) of its n > 1 group's first sample


def normalise_request(
    tokenizer: PreTrainedTokenizerBase, limits: RequestLimits, prompt: Any,
    sampling_params: Any, input_ids: Any, return_logprob: bool, logprob_start_len: int,
    top_logprobs_num: int, return_text_in_logprobs: bool, rid: Any,
) -> tuple[bool, list[GenerateInput]]:
    """Returns (is_batch, inputs) with inputs prompt-major: prompt i, sample j at i * n + j."""
    batched, prompts = _token_prompts(tokenizer, prompt, input_ids)
    params = _sampling_per_prompt(sampling_params, len(prompts), batched)
    rids = _rids(rid, len(prompts), batched)
    _check_int("logprob_start_len", logprob_start_len, minimum=-1)
    _check_int("top_logprobs_num", top_logprobs_num, minimum=0)
    logprob = LogprobRequest(logprob_start_len, top_logprobs_num) if return_logprob else None
    inputs: list[GenerateInput] = []
    for ids, sampling, base_rid in zip(prompts, params, rids, strict=True):
        sampling = _with_budget(sampling, len(ids), limits)
        _check_prompt(ids, sampling, limits)
        leader = len(inputs) if sampling.n > 1 else None
        for j in range(sampling.n):
            inputs.append(GenerateInput(
                ids, _nth_sample(sampling, j), base_rid if sampling.n == 1 else f"{base_rid}-{j}",
                logprob, return_text_in_logprobs, None if j == 0 else leader,
            ))
    return batched, inputs


def _token_prompts(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, input_ids: Any
) -> tuple[bool, list[list[int]]]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("exactly one of 'text' (prompt) and 'input_ids' must be given")
    if prompt is not None:
        if isinstance(prompt, str):
            return False, [tokenizer.encode(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return True, [tokenizer.encode(p) for p in prompt]
        raise ValueError("'text' must be a string or a non-empty list of strings")
    if isinstance(input_ids, list) and input_ids and all(_is_id(t) for t in input_ids):
        return False, [list(input_ids)]
    if (
        isinstance(input_ids, list) and input_ids
        and all(isinstance(p, list) and all(_is_id(t) for t in p) for p in input_ids)
    ):
        return True, [list(p) for p in input_ids]
    raise ValueError("'input_ids' must be a non-empty list of ints or a list of such lists")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampling_per_prompt(params: Any, count: int, batched: bool) -> list[SamplingParams]:
    if isinstance(params, list):
        if not batched or len(params) != count:
            raise ValueError(
                f"'sampling_params' is a list of {len(params)} but there are {count} prompts"
            )
        return [_parse_sampling(p) for p in params]
    parsed = _parse_sampling(params)
    return [parsed] * count


def _parse_sampling(params: Any) -> SamplingParams:
    if params is not None and not isinstance(params, dict):
        raise ValueError("'sampling_params' must be an object (or a list of objects)")
    return SamplingParams.from_dict(params)


def _rids(rid: Any, count: int, batched: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if batched:
        if not (
            isinstance(rid, list) and len(rid) == count and all(isinstance(r, str) for r in rid)
        ):
            raise ValueError("'rid' for a batch must be a list of strings, one per prompt")
        return list(rid)
    if not isinstance(rid, str):
        raise ValueError("'rid' must be a string")
    return [rid]


def _with_budget(sampling: SamplingParams, prompt_len: int, limits: RequestLimits
                 ) -> SamplingParams:
    """`max_new_tokens: None` (SGLang's, and OpenAI chat's default) means whatever the
    context length, or the KV pool if smaller, leaves after the prompt. A copy: one
    SamplingParams may serve a batch."""
    if sampling.max_new_tokens is not None:
        return sampling
    room = min(limits.context_len, limits.pool_size) - prompt_len
    return dataclasses.replace(sampling, max_new_tokens=max(room, 0))


def _check_prompt(ids: list[int], sampling: SamplingParams, limits: RequestLimits) -> None:
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(
            f"'input_ids' has token ids outside the vocabulary [0, {limits.vocab_size}): "
            f"{bad[:8]}"
        )
    sampling.validate(limits.vocab_size)
    total = len(ids) + sampling.max_new_tokens
    if total > limits.context_len:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} "
            f"exceeds the context length {limits.context_len}"
        )
    if len(ids) >= limits.pool_size:
        raise ValueError(
            f"prompt ({len(ids)} tokens) does not fit the KV pool ({limits.pool_size} tokens)"
        )
    if total > limits.pool_size:
        # Alone in the engine it would still run out of slots, be retracted and recomputed,
        # over and over: it could never finish.
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} "
            f"exceeds the KV pool ({limits.pool_size} tokens); lower max_new_tokens or raise "
            "max_total_tokens"
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_id(value) or value < minimum:
        raise ValueError(f"{name!r} must be an integer >= {minimum}, got {value!r}")


def _nth_sample(sampling: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n samples: one request each; a seed is offset so samples differ."""
    seed = sampling.sampling_seed
    return dataclasses.replace(sampling, n=1, sampling_seed=None if seed is None else seed + j)
