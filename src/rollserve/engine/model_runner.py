"""Turns one scheduled step into tensors, runs the model, and returns the logits rows that
the step needs (sampling rows and input-logprob rows only: the lm_head is costly)."""

from __future__ import annotations

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
class StepLogits:
    logits: torch.Tensor  # [rows, vocab] in the model dtype
    sample_reqs: list[Req]  # row i samples for sample_reqs[i]; rows [0, len) are these
    input_logprob_rows: list[tuple[ExtendChunk, range, int]]  # (chunk, positions, first row)


class ModelRunner:
    def __init__(
        self, model: CausalLM, pool: KVPool, table: ReqToTokenTable,
        decode_kernel: DecodeAttention | None = None,
    ) -> None:
        self.model, self.pool, self.table = model, pool, table
        self.decode_kernel = decode_kernel
        self.device = pool.device
        self.extend_kernel = _extend_kernel_like(decode_kernel, self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, out_slots: torch.Tensor) -> StepLogits:
        """`out_slots` holds a fresh pool slot per token of the batch, in batch order."""
        input_ids, positions = self._tokens(batch)
        self._record_slots(batch, out_slots)
        attention = self._attention_batch(batch, positions, out_slots)
        with attention_backends():
            hidden = self.model(input_ids, attention)
        rows, sample_reqs, logprob_rows = self._logit_rows(batch)
        logits = self.model.compute_logits(hidden[rows.to(self.device)])
        return StepLogits(logits, sample_reqs, logprob_rows)

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

    def _attention_batch(
        self, batch: ScheduledBatch, positions: torch.Tensor, out_slots: torch.Tensor
    ) -> AttentionBatch:
        table = self.table.slots
        decode_slots = kv_lens = padding = None
        if batch.decodes:
            lens = [r.seq_len for r in batch.decodes]
            kv_lens = torch.tensor(lens, device=self.device)
            rows = torch.tensor([r.table_row for r in batch.decodes], device=self.device)
            decode_slots = table[rows, : max(lens)]
            if self.decode_kernel is None:
                span = torch.arange(max(lens), device=self.device)
                padding = (span[None, :] >= kv_lens[:, None])[:, None, :]
        spans, offset = [], len(batch.decodes)
        for chunk in batch.extends:
            size = chunk.end - chunk.start
            spans.append(ExtendSpan(
                offset, offset + size, table[chunk.req.table_row, : chunk.end],
                _prefix_causal_mask(chunk.start, chunk.end, self.device),
            ))
            offset += size
        return AttentionBatch(
            positions, out_slots, len(batch.decodes), decode_slots, kv_lens, padding, spans,
            self.pool.k_cache, self.pool.v_cache, self.decode_kernel, self.extend_kernel,
        )

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
