"""A generation request's state as it moves through the scheduler, and its public output."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rollserve.engine.detokenizer import IncrementalDetokenizer
from rollserve.engine.radix_cache import RadixNode
from rollserve.engine.sampling_params import SamplingParams

Logprob = tuple[float | None, int]  # (logprob, token_id); text is added when output is built


@dataclass(slots=True, frozen=True)
class FinishReason:
    type: str  # "length", "stop" or "abort"
    length: int | None = None
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        return {"type": "abort", "message": self.message}


@dataclass(slots=True)
class LogprobRequest:
    start_len: int = -1  # first prompt position with an input logprob; -1: none
    top_num: int = 0


@dataclass(slots=True)
class Req:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    detokenizer: IncrementalDetokenizer
    on_output: Callable[[Req], None]  # called from the engine thread after every step
    logprob: LogprobRequest | None = None
    seed_generator: torch.Generator | None = None
    # The first sibling of an n > 1 group: siblings wait until its prompt is cached.
    leader: Req | None = None
    # The weights the request runs on: set when it is first scheduled (`started`), and moved
    # on when weights change under a paused request (see Scheduler.weights_changed).
    weight_version: str = "default"
    started: bool = False

    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_text_len: int | None = None  # where the output text is cut at a stop string

    # KV state. `fill_ids` are the tokens whose KV the request needs (prompt, then outputs
    # fed back); the first `kv_len` of them have KV in the pool, listed in its table row.
    table_row: int | None = None
    kv_len: int = 0
    tree_len: int = 0  # the first tree_len slots of the row belong to the radix cache...
    tree_node: RadixNode | None = None  # ...which is locked at this node while we run
    cache_epoch: int = 0  # the cache epoch our KV belongs to; another epoch: KV is stale
    cached_tokens: int = 0
    prefill_done: bool = False
    input_logprobs_done: bool = False

    output_logprobs: list[Logprob] = field(default_factory=list)
    output_top_logprobs: list[list[Logprob]] = field(default_factory=list)
    input_logprobs: list[Logprob] = field(default_factory=list)
    input_top_logprobs: list[list[Logprob] | None] = field(default_factory=list)

    created: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float = 0.0
    finished_time: float | None = None

    @property
    def fill_ids(self) -> list[int]:
        """A new list: per-step code uses seq_len, last_token and fill_range, which do not
        copy the whole sequence."""
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.input_ids[-1]

    def fill_range(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end]."""
        prompt = len(self.input_ids)
        return (self.input_ids[start:end]
                + self.output_ids[max(start - prompt, 0) : max(end - prompt, 0)])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        text = self.detokenizer.text
        return text if self.stop_text_len is None else text[: self.stop_text_len]

    @property
    def wants_input_logprobs(self) -> bool:
        return (
            self.logprob is not None and self.logprob.start_len >= 0
            and not self.input_logprobs_done
        )

    def cache_match_limit(self) -> int:
        """How many leading prompt tokens may come from the cache: at least one token must be
        computed (its logits sample the first output), and positions whose input logprobs are
        wanted must be computed too."""
        limit = self.seq_len - 1
        if self.wants_input_logprobs:
            limit = min(limit, max(self.logprob.start_len - 1, 0))
        return limit
