"""`GenerationAPI`: the generate/stream calls of an engine, built on its `submit` and
`abort`. Shared by the in-process `Engine` and `EngineProcess` (the engine in a child
process), so both answer the same calls the same way."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

from rollserve.engine.validation import GenerateInput, RequestLimits, normalise_request

logger = logging.getLogger(__name__)

Prompt = str | list[str] | None
TokenIds = list[int] | list[list[int]] | None
OnOutput = Callable[[int, dict[str, Any], bool], None]


def deliver(on_output: OnOutput, index: int, output: dict[str, Any], finished: bool) -> None:
    """Call a submitter's callback. Its failure (say, its event loop has closed) is logged and
    stays its own: the engine and every other request go on."""
    try:
        on_output(index, output, finished)
    except Exception:
        logger.exception("the output callback of request %s failed; other requests go on",
                         output["meta_info"]["id"])


class GenerationAPI(ABC):
    """Needs `tokenizer` and `limits` (request validation runs in the caller's process), and
    `submit`/`abort` from the subclass."""

    tokenizer: PreTrainedTokenizerBase
    limits: RequestLimits

    @abstractmethod
    def submit(self, inputs: list[GenerateInput], on_output: OnOutput, stream: bool) -> None:
        """Queue prepared inputs. `on_output(index, output, finished)` runs on a thread of the
        engine's: after every step when streaming, else only when the request finishes."""

    @abstractmethod
    def abort(self, rid: str) -> None:
        """Finish the request with an abort reason (its KV is freed at the next step)."""

    def generate(
        self, prompt: Prompt = None, sampling_params: dict | list[dict] | None = None,
        input_ids: TokenIds = None, return_logprob: bool = False, logprob_start_len: int = -1,
        top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Blocking generation. A single prompt with n == 1 returns one dict; otherwise a
        list, prompt-major with n samples each (index i * n + j)."""
        batched, inputs = self.prepare(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
            top_logprobs_num, return_text_in_logprobs, rid,
        )
        done = [concurrent.futures.Future() for _ in inputs]

        def on_output(i: int, output: dict[str, Any], finished: bool) -> None:
            if finished:
                done[i].set_result(output)

        self.submit(inputs, on_output, stream=False)
        outputs = [f.result() for f in done]
        return outputs if batched or len(outputs) > 1 else outputs[0]

    async def async_generate(
        self, prompt: Prompt = None, sampling_params: dict | list[dict] | None = None,
        input_ids: TokenIds = None, return_logprob: bool = False, logprob_start_len: int = -1,
        top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """`generate` for asyncio code."""
        batched, inputs = self.prepare(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
            top_logprobs_num, return_text_in_logprobs, rid,
        )
        outputs: list[dict[str, Any]] = [{} for _ in inputs]
        async for index, output, finished in self.stream_inputs(inputs, stream=False):
            if finished:
                outputs[index] = output
        return outputs if batched or len(outputs) > 1 else outputs[0]

    def stream(
        self, prompt: Prompt = None, sampling_params: dict | list[dict] | None = None,
        input_ids: TokenIds = None, return_logprob: bool = False, logprob_start_len: int = -1,
        top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
        rid: str | list[str] | None = None,
    ) -> Iterator[tuple[int, dict[str, Any], bool]]:
        """An iterator of (index, cumulative output, finished) after every step that advanced
        a request (index as in `generate`'s list). The request is checked here and submitted
        when iteration starts; leaving the loop early aborts the requests still running."""
        _, inputs = self.prepare(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
            top_logprobs_num, return_text_in_logprobs, rid,
        )
        return self._iterate(inputs)

    async def async_stream(
        self, prompt: Prompt = None, sampling_params: dict | list[dict] | None = None,
        input_ids: TokenIds = None, return_logprob: bool = False, logprob_start_len: int = -1,
        top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
        rid: str | list[str] | None = None,
    ) -> AsyncIterator[tuple[int, dict[str, Any], bool]]:
        """`stream` for asyncio code (`async for`)."""
        _, inputs = self.prepare(
            prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
            top_logprobs_num, return_text_in_logprobs, rid,
        )
        async for update in self.stream_inputs(inputs, stream=True):
            yield update

    def _iterate(self, inputs: list[GenerateInput]) -> Iterator[tuple[int, dict[str, Any], bool]]:
        """`stream_inputs` for a thread that may block: the updates wait in a thread-safe
        queue instead of an event loop."""
        updates: queue.SimpleQueue[tuple[int, dict[str, Any], bool]] = queue.SimpleQueue()
        self.submit(inputs, lambda *update: updates.put(update), stream=True)
        remaining = len(inputs)
        try:
            while remaining:
                update = updates.get()
                remaining -= update[2]
                yield update
        finally:
            if remaining:
                for item in inputs:
                    self.abort(item.rid)

    async def stream_inputs(
        self, inputs: list[GenerateInput], stream: bool
    ) -> AsyncIterator[tuple[int, dict[str, Any], bool]]:
        """Submit prepared inputs and yield their updates; leaving early (or being
        cancelled) aborts the requests still running, freeing their KV slots."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, dict[str, Any], bool]] = asyncio.Queue()

        def on_output(i: int, output: dict[str, Any], finished: bool) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, (i, output, finished))

        self.submit(inputs, on_output, stream=stream)
        remaining = len(inputs)
        try:
            while remaining:
                update = await updates.get()
                remaining -= update[2]
                yield update
        finally:
            if remaining:
                for item in inputs:
                    self.abort(item.rid)

    def prepare(
        self, prompt: Prompt, sampling_params: dict | list[dict] | None, input_ids: TokenIds,
        return_logprob: bool = False, logprob_start_len: int = -1, top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False, rid: str | list[str] | None = None,
    ) -> tuple[bool, list[GenerateInput]]:
        """Validate and normalise a generate call; raises ValueError naming the problem."""
        return normalise_request(
            self.tokenizer, self.limits, prompt, sampling_params, input_ids, return_logprob,
            logprob_start_len, top_logprobs_num, return_text_in_logprobs, rid,
        )

