"""Attention over the token-level KV pool: the one attention path of the engine.

A forward pass sees a flattened batch of tokens ordered as [all decode tokens, then each
extend (prefill) sequence's tokens]. Each layer first writes the batch's K/V into the pool
(write_kv, or the native rotary kernel), then attends over the pool. Decode tokens attend
through the native CPU kernel when the batch carries one (rollserve.kernels.decode_attention),
else as one padded PyTorch batch. Each extend sequence attends on its own: through the native
CPU kernel when the batch carries one (rollserve.kernels.prefill_attention: bf16 on
AVX512_BF16 CPUs, float32 on AVX-512 and AVX2; K/V read from the pool in place), else through
SDPA on its K/V gathered from the pool (a bf16 span on CPU padded at the end to SDPA's block
size, see _causal_padding).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rollserve.kernels.decode_attention import DecodeAttention
from rollserve.kernels.prefill_attention import PrefillAttention

_SDPA_BF16_BLOCK = 32
# cuDNN's SDPA builds an execution plan for every new (query length, key length) pair, tens
# of ms each on an H100; extend lengths rarely repeat, so it paid that on almost every call
# (bench.offline's prefill steps: 11.8 s with it, 1.4 s without; BENCHMARKS.md, "On a CUDA
# GPU"). The CPU never picks cuDNN: leaving it out changes nothing there.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(slots=True)
class ExtendSpan:
    start: int  # first row of this sequence in the flattened batch
    end: int
    kv_slots: torch.Tensor  # [kv_len] pool slots, cached prefix first, then this chunk
    mask: torch.Tensor | None  # [q_len, kv_len] bool, None when plain causal (no prefix);
    # SDPA's input only: the extend kernel reads the same mask off kv_len - q_len


@dataclass(slots=True)
class AttentionBatch:
    """Where each token's K/V goes, and which cached tokens every query may see."""

    positions: torch.Tensor  # [tokens]
    out_slots: torch.Tensor  # [tokens] pool slot receiving each token's K/V
    num_decode: int  # rows [0, num_decode) are decode tokens
    decode_kv_slots: torch.Tensor | None  # [num_decode, max_kv_len], padded with slot 0
    decode_kv_lens: torch.Tensor | None  # [num_decode] int64 (the kernel's input)
    decode_padding: torch.Tensor | None  # [num_decode, 1, max_kv_len] bool, True = padding;
    # built once per step, and only for the PyTorch path (decode_kernel is None)
    extends: list[ExtendSpan]
    k_cache: torch.Tensor  # [layers, kv_heads, slots, head_dim]
    v_cache: torch.Tensor
    decode_kernel: DecodeAttention | None = None  # None: the PyTorch path below
    extend_kernel: PrefillAttention | None = None  # None: SDPA (_attend_extend)


def attention_backends() -> AbstractContextManager:
    """Wraps a forward pass: SDPA without cuDNN. The flags are process-wide, so the engine sets
    them per step (~15 us) rather than for its lifetime, which would also bind other threads
    of the process (a colocated trainer's)."""
    return sdpa_kernel(_SDPA_BACKENDS)


def write_kv(layer: int, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch) -> None:
    """k, v [tokens, kv_heads, dim] into the pool at the batch's out_slots. (With native
    kernels the model writes them in its rotary kernel, FusedElementwise.rotary_store_kv.)"""
    batch.k_cache[layer][:, batch.out_slots] = k.transpose(0, 1)
    batch.v_cache[layer][:, batch.out_slots] = v.transpose(0, 1)


def paged_attention(
    layer: int, q: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q: [tokens, heads, dim] -> [tokens, heads, dim]. The pool already holds this step's
    K/V at the batch's out_slots (write_kv): every query reads its keys there."""
    k_cache, v_cache = batch.k_cache[layer], batch.v_cache[layer]
    out = torch.empty_like(q)
    n = batch.num_decode
    if n and batch.decode_kernel is not None:
        out[:n] = batch.decode_kernel(
            q[:n], k_cache, v_cache, batch.decode_kv_slots, batch.decode_kv_lens, scale
        )
    elif n:
        out[:n] = _attend_decode(q[:n], k_cache, v_cache, batch, scale)
    for span in batch.extends:
        rows = slice(span.start, span.end)
        if batch.extend_kernel is not None:
            batch.extend_kernel(q[rows], k_cache, v_cache, span.kv_slots, scale, out[rows])
        else:
            out[rows] = _attend_extend(q[rows], k_cache, v_cache, span, scale)
    return out


def _attend_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """One query per sequence: two batched matmuls over (kv head, sequence), with the query
    heads sharing a KV head stacked as rows (GQA without repeating K/V). ~25% faster than
    SDPA's CPU kernel at decode shapes."""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    slots = batch.decode_kv_slots
    k = _gather(k_cache, slots)  # [kv_heads, n, kv_len, dim], contiguous
    v = _gather(v_cache, slots)
    grouped = q.view(n, kv_heads, heads // kv_heads, dim).transpose(0, 1)
    scores = torch.matmul(grouped * scale, k.transpose(-1, -2))  # [kv_heads, n, group, kv_len]
    scores = scores.masked_fill(batch.decode_padding, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(n, heads, dim)


def _attend_extend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: ExtendSpan,
    scale: float,
) -> torch.Tensor:
    """q: [q_len, heads, dim] of one sequence -> [q_len, heads, dim]."""
    q_len, queries, slots = q.shape[0], q.transpose(0, 1)[None], span.kv_slots
    if pad := _causal_padding(q, span):
        queries = F.pad(queries, (0, 0, 0, pad))
        slots = torch.cat([slots, slots[-1:].expand(pad)])  # any real slot: never attended
    k = _gather(k_cache, slots[None]).transpose(0, 1)  # [1, kv_heads, kv_len, dim]
    v = _gather(v_cache, slots[None]).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        queries, k, v, attn_mask=span.mask, is_causal=span.mask is None, scale=scale,
        enable_gqa=True,
    )
    return out[0, :, :q_len].transpose(0, 1)


def _causal_padding(q: torch.Tensor, span: ExtendSpan) -> int:
    """Rows to append to a plain causal span. SDPA's CPU kernel runs bfloat16 about twice as
    fast when the length is a multiple of 32 (its AMX blocks; float32 and float16 gain
    nothing). Padding a causal span at the end changes no real row: causal masking keeps every
    real query off the appended keys, and the appended query rows are dropped."""
    if span.mask is not None or q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return 0
    return -q.shape[0] % _SDPA_BF16_BLOCK


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [kv_heads, slots, dim], slots [batch, kv_len] -> [kv_heads, batch, kv_len, dim].
    One row gather per head along dim 0: ~2x faster on CPU than index_select on dim 1."""
    kv_heads, _, dim = cache.shape
    flat = slots.reshape(-1)
    out = torch.empty((kv_heads, flat.numel(), dim), dtype=cache.dtype, device=cache.device)
    for head in range(kv_heads):
        torch.index_select(cache[head], 0, flat, out=out[head])
    return out.view(kv_heads, *slots.shape, dim)
