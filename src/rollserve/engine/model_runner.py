"""Turns one scheduled step into tensors (`ForwardInputs`), runs the model, and returns the
logits rows that the step needs (sampling rows and input-logprob rows only: the lm_head is
costly). With tensor parallelism the same inputs go to every rank (engine/tp.py), and each
runs `RankForward` on its share of the model and of the KV pool."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rollserve.engine.kv_pool import KVPool, ReqToTokenTable
from rollserve.engine.request import Req
from rollserve.kernels.decode_attention import DecodeAttention
from rollserve.kernels.prefill_attention import PrefillAttention, make_prefill_attention
from rollserve.models.attention import AttentionBatch, ExtendSpan, attention_backends
from rollserve.models.llama import CausalLM


@dataclass(slots=True)
class ExtendChunk:
    req: Req
    start: int  # positions [start, end) of req.fill_ids are computed in this step
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def completes_prompt(self) -> bool:
        return self.end == self.req.seq_len

    def input_logprob_positions(self) -> range:
        """Positions p whose logits give the input logprob of token p + 1."""
        if not self.req.wants_input_logprobs:
            return range(0)
        first = max(self.start, self.req.logprob.start_len - 1, 0)
        return range(first, min(self.end, len(self.req.input_ids) - 1))


@dataclass(slots=True)
class ScheduledBatch:
    decodes: list[Req]  # each feeds its last sampled token
    extends: list[ExtendChunk]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.end - c.start for c in self.extends)


@dataclass(slots=True)
class ExtendInput:
    first_row: int  # of this sequence's tokens in the flattened batch
    start: int  # its positions [start, end) are computed in this step
    end: int
    kv_slots: torch.Tensor  # [end] pool slots of positions 0..end-1


@dataclass(slots=True)
class ForwardInputs:
    """One step's forward, as tensors and slot indices: the same on every TP rank (each
    rank's KV pool has the same slots, holding its own KV heads)."""

    input_ids: torch.Tensor  # [tokens]: decode tokens first, then each extend's
    positions: torch.Tensor  # [tokens]
    out_slots: torch.Tensor  # [tokens] pool slot receiving each token's K/V
    decode_kv_slots: torch.Tensor | None  # [decodes, max_kv_len], padded with slot 0
    decode_kv_lens: torch.Tensor | None  # [decodes]
    extends: list[ExtendInput]
    logit_rows: torch.Tensor  # rows of the hidden states whose logits the step needs

    @property
    def num_decode(self) -> int:
        return 0 if self.decode_kv_lens is None else self.decode_kv_lens.numel()

    def to(self, device: torch.device) -> ForwardInputs:
        """These inputs on `device` (itself where they are there already): the pipe to the
        other ranks carries them on the CPU, each rank moves them to its own GPU."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        extends = [ExtendInput(e.first_row, e.start, e.end, move(e.kv_slots))
                   for e in self.extends]
        return ForwardInputs(move(self.input_ids), move(self.positions), move(self.out_slots),
                             move(self.decode_kv_slots), move(self.decode_kv_lens), extends,
                             move(self.logit_rows))


@dataclass(slots=True)
class StepLogits:
    logits: torch.Tensor  # [rows, vocab] in the model dtype
    sample_reqs: list[Req]  # row i samples for sample_reqs[i]; rows [0, len) are these
    input_logprob_rows: list[tuple[ExtendChunk, range, int]]  # (chunk, positions, first row)


class RankForward:
    """The forward of one rank: its model (share), KV pool (share) and attention kernels."""

    def __init__(self, model: CausalLM, pool: KVPool,
                 decode_kernel: DecodeAttention | None = None) -> None:
        self.model, self.pool = model, pool
        self.decode_kernel = decode_kernel
        self.extend_kernel = _extend_kernel_like(decode_kernel, pool.device)

    @torch.inference_mode()
    def __call__(self, inputs: ForwardInputs) -> torch.Tensor:
        """Logits [logit rows, vocab] in the model dtype."""
        with attention_backends():
            hidden = self.model(inputs.input_ids, self._attention_batch(inputs))
        return self.model.compute_logits(hidden[inputs.logit_rows])

    def _attention_batch(self, inputs: ForwardInputs) -> AttentionBatch:
        device, lens, padding = self.pool.device, inputs.decode_kv_lens, None
        if lens is not None and self.decode_kernel is None:
            span = torch.arange(inputs.decode_kv_slots.shape[1], device=device)
            padding = (span[None, :] >= lens[:, None])[:, None, :]
        spans = [ExtendSpan(e.first_row, e.first_row + e.end - e.start, e.kv_slots,
                            _prefix_causal_mask(e.start, e.end, device))
                 for e in inputs.extends]
        return AttentionBatch(
            inputs.positions, inputs.out_slots, inputs.num_decode, inputs.decode_kv_slots, lens,
            padding, spans, self.pool.k_cache, self.pool.v_cache, self.decode_kernel,
            self.extend_kernel,
        )


class ModelRunner:
    """Rank 0's side of a step: inputs from the scheduled batch, sent to the other TP ranks
    (`send`, when there are any) before this rank runs its own forward."""

    def __init__(
        self, forward: RankForward, table: ReqToTokenTable,
        send: Callable[[ForwardInputs], None] | None = None,
    ) -> None:
        self.forward, self.table, self.send = forward, table, send
        self.device = forward.pool.device

    def run(self, batch: ScheduledBatch, out_slots: torch.Tensor) -> StepLogits:
        """`out_slots` holds a fresh pool slot per token of the batch, in batch order."""
        self._record_slots(batch, out_slots)
        rows, sample_reqs, logprob_rows = self._logit_rows(batch)
        inputs = self._inputs(batch, out_slots, rows.to(self.device))
        if self.send is not None:
            self.send(inputs)
        return StepLogits(self.forward(inputs), sample_reqs, logprob_rows)

    def _inputs(self, batch: ScheduledBatch, out_slots: torch.Tensor,
                logit_rows: torch.Tensor) -> ForwardInputs:
        input_ids, positions = self._tokens(batch)
        table, decode_slots, kv_lens = self.table.slots, None, None
        if batch.decodes:
            lens = [r.seq_len for r in batch.decodes]
            kv_lens = torch.tensor(lens, device=self.device)
            rows = torch.tensor([r.table_row for r in batch.decodes], device=self.device)
            decode_slots = table[rows, : max(lens)]
        extends, offset = [], len(batch.decodes)
        for chunk in batch.extends:
            # a copy, not a view: a view would pickle the whole table to every TP rank
            extends.append(ExtendInput(offset, chunk.start, chunk.end,
                                       table[chunk.req.table_row, : chunk.end].clone()))
            offset += chunk.size
        return ForwardInputs(input_ids, positions, out_slots, decode_slots, kv_lens, extends,
                             logit_rows)

    def _tokens(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [r.last_token for r in batch.decodes]
        positions = [r.seq_len - 1 for r in batch.decodes]
        for chunk in batch.extends:
            ids.extend(chunk.req.fill_range(chunk.start, chunk.end))
            positions.extend(range(chunk.start, chunk.end))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions)

    def _record_slots(self, batch: ScheduledBatch, out_slots: torch.Tensor) -> None:
        table = self.table.slots
        n = len(batch.decodes)
        if n:
            rows = torch.tensor([r.table_row for r in batch.decodes], device=self.device)
            cols = torch.tensor([r.seq_len - 1 for r in batch.decodes], device=self.device)
            table[rows, cols] = out_slots[:n]
        offset = n
        for chunk in batch.extends:
            size = chunk.end - chunk.start
            table[chunk.req.table_row, chunk.start : chunk.end] = out_slots[offset : offset + size]
            offset += size

    def _logit_rows(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, list[Req], list[tuple[ExtendChunk, range, int]]]:
        sample_rows = list(range(len(batch.decodes)))
        sample_reqs = list(batch.decodes)
        offset = len(batch.decodes)
        for chunk in batch.extends:
            if chunk.completes_prompt:
                sample_rows.append(offset + chunk.end - chunk.start - 1)
                sample_reqs.append(chunk.req)
            offset += chunk.end - chunk.start
        rows, logprob_rows, offset = list(sample_rows), [], len(batch.decodes)
        for chunk in batch.extends:
            wanted = chunk.input_logprob_positions()
            if wanted:
                logprob_rows.append((chunk, wanted, len(rows)))
                rows.extend(offset + p - chunk.start for p in wanted)
            offset += chunk.end - chunk.start
        return torch.tensor(rows, dtype=torch.int64), sample_reqs, logprob_rows


def _extend_kernel_like(
    decode_kernel: DecodeAttention | None, device: torch.device
) -> PrefillAttention | None:
    """The native extend-attention kernel wherever it applies and the engine built a decode
    kernel: native kernels are on (no --disable-native-kernels, a compiler, AVX2 or better)
    and the decode kernel knows the model's head layout and dtype. None: SDPA."""
    if decode_kernel is None:
        return None
    return make_prefill_attention(
        device, decode_kernel.dtype, decode_kernel.head_dim, decode_kernel.group
    )


def _prefix_causal_mask(start: int, end: int, device: torch.device) -> torch.Tensor | None:
    """Query i (position start + i) sees keys 0..start + i; None means plain causal."""
    if start == 0:
        return None
    queries = torch.arange(start, end, device=device)[:, None]
    keys = torch.arange(end, device=device)[None, :]
    return keys <= queries
