"""`EngineAPI`: every call an engine answers, declared once. The in-process `Engine` and
`EngineProcess` (an Engine in a child process, the server's) both implement it, so the
server, the tests and embedding programs hold either through this one type.

The generate/stream calls are written here once, on top of each engine's `submit` and
`abort`; the rest (cache, stats, weight updates, pause) each engine answers its own way."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Self

import torch
from transformers import PreTrainedTokenizerBase

from rollserve.engine.args import EngineArgs
from rollserve.engine.latency import Histogram
from rollserve.engine.validation import GenerateInput, RequestLimits, normalise_request
from rollserve.models.config import ModelConfig
from rollserve.weights.updater import DEFAULT_GROUP

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


class EngineAPI(ABC):
    """An engine: its facts (set once the model is loaded), the generation calls, and SGLang's
    control calls. Requests are validated and tokenized in the caller's process."""

    args: EngineArgs
    tokenizer: PreTrainedTokenizerBase
    limits: RequestLimits
    model_config: ModelConfig
    context_len: int
    device: torch.device

    # ---- generation ---------------------------------------------------------------------

    @abstractmethod
    def submit(self, inputs: list[GenerateInput], on_output: OnOutput, stream: bool) -> None:
        """Queue prepared inputs. `on_output(index, output, finished)` runs on a thread of the
        engine's: after every step when streaming, else only when the request finishes."""

    @abstractmethod
    def abort(self, rid: str) -> None:
        """Finish the request with an abort reason (its KV is freed at the next step)."""

    @abstractmethod
    def abort_all(self, message: str = "aborted by request") -> None:
        """Finish every request with an abort reason."""

    # ---- cache and statistics -----------------------------------------------------------

    @abstractmethod
    def flush_cache(self) -> int:
        """Drop every cache entry no running request uses; returns the tokens freed."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Queue lengths, KV use, step counts and times (the server's /get_load, /metrics)."""

    @abstractmethod
    def latency_histograms(self) -> dict[str, Histogram]:
        """Copies of the time-to-first-token and inter-token latency histograms."""

    # ---- weight updates (SGLang's RL API) ------------------------------------------------
    #
    # An update installs new weights once every request that has started is finished; new
    # requests wait meanwhile, so each request runs on one weight version (its meta_info
    # `weight_version`). While paused (pause_generation) updates install at once. The cache
    # is flushed after an update unless flush_cache=False. Each returns the new version.

    @property
    @abstractmethod
    def weight_version(self) -> str:
        """The version of the weights in use ("default" until an update names one)."""

    @abstractmethod
    def weights_metadata(self) -> dict[str, Any]:
        """What an update may carry: every weight's HF name, dtype and shape."""

    @abstractmethod
    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """The weight's first `truncate_size` rows as nested lists (SGLang's answer)."""

    @abstractmethod
    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = DEFAULT_GROUP, backend: str = "gloo",
    ) -> None:
        """Join a trainer's weight-sync group at rank `rank_offset`; blocks until all
        `world_size` ranks have joined. Generation goes on meanwhile."""

    @abstractmethod
    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> None:
        """Leave the group; tensors staged from it and not yet applied are dropped."""

    @abstractmethod
    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]],
        group_name: str = DEFAULT_GROUP, flush_cache: bool = True,
        weight_version: str | None = None, load_format: str | None = None,
        abort_all_requests: bool = False, apply: bool = True,
    ) -> str:
        """Receive the tensors the trainer broadcasts from rank 0, one per name in order, and
        install them. Raises ValueError naming the tensor, before receiving anything, for an
        unknown name, a wrong shape or a non-floating dtype (the trainer must then not
        broadcast). `apply=False` (rollserve extension) stages them for the next update that
        applies, so that many buckets switch weights at once."""

    @abstractmethod
    def update_weights_from_tensor(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True,
        weight_version: str | None = None, abort_all_requests: bool = False,
        apply: bool = True,
    ) -> str:
        """Install in-memory tensors (same checks as update_weights_from_distributed)."""

    @abstractmethod
    def update_weights_from_serialized(
        self, payload: str | list[str], load_format: str | None = None,
        flush_cache: bool = True, weight_version: str | None = None,
        abort_all_requests: bool = False, apply: bool = True,
    ) -> str:
        """`update_weights_from_tensor` for SGLang's serialized tensors (the HTTP endpoint's
        form), opened in the engine's processes: CUDA IPC handles only open where they run.
        `payload`: one for every rank, or a list with one per tensor-parallel rank (rank r
        reads the r-th, as in SGLang); another count raises ValueError."""

    @abstractmethod
    def update_weights_from_disk(
        self, model_path: str, flush_cache: bool = True, weight_version: str | None = None,
        abort_all_requests: bool = False,
    ) -> str:
        """Install a whole checkpoint of the same architecture (a directory, a .gguf file or a
        model name); on any mismatch raises ValueError and the current weights keep serving."""

    @abstractmethod
    def pause_generation(self, mode: str = "abort") -> None:
        """Stop generating; weight updates then install at once. Modes: abort (requests in
        flight finish with an abort reason), retract (they drop their KV and recompute it on
        continue), in_place (they keep their KV and continue on whatever weights are in)."""

    @abstractmethod
    def continue_generation(self) -> None:
        """Resume after pause_generation."""

    @abstractmethod
    def shutdown(self) -> None:
        """Requests in flight finish with an abort; returns once the engine has stopped."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- generation calls, the same for every engine ------------------------------------

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

