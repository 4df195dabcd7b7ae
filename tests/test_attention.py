"""Prefill (extend) attention over the KV pool against a float64 reference, including the
bfloat16 CPU spans that are padded to SDPA's block size and the spans that extend a cached
prefix."""

from __future__ import annotations

import pytest
import torch

from rollserve.models.attention import AttentionBatch, ExtendSpan, paged_attention, write_kv

HEADS, KV_HEADS, DIM, POOL = 6, 2, 32, 4096


def _reference(q, keys, values, first_position) -> torch.Tensor:
    """q [q_len, heads, dim]; keys/values [kv_heads, kv_len, dim]; query i sits at position
    first_position + i and sees keys 0..first_position + i."""
    q_len, group = q.shape[0], HEADS // KV_HEADS
    k = keys.double().repeat_interleave(group, 0)
    v = values.double().repeat_interleave(group, 0)
    scores = torch.einsum("qhd,hkd->hqk", q.double(), k) * DIM**-0.5
    visible = torch.arange(keys.shape[1])[None] <= torch.arange(q_len)[:, None] + first_position
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    return torch.einsum("hqk,hkd->qhd", probs, v)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 5e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("prefix", "q_len"), [(0, 1), (0, 31), (0, 32), (0, 33), (0, 292),
                                              (40, 1), (64, 77), (300, 45)])
def test_extend_attention_matches_float64_reference(dtype, tolerance, prefix, q_len) -> None:
    gen = torch.Generator().manual_seed(prefix * 1000 + q_len)
    k_cache = torch.randn(1, KV_HEADS, POOL, DIM, generator=gen).to(dtype)
    v_cache = torch.randn(1, KV_HEADS, POOL, DIM, generator=gen).to(dtype)
    slots = torch.randperm(POOL - 1, generator=gen)[: prefix + q_len] + 1  # scattered, not 0
    q = torch.randn(q_len, HEADS, DIM, generator=gen).to(dtype)
    k = torch.randn(q_len, KV_HEADS, DIM, generator=gen).to(dtype)
    v = torch.randn(q_len, KV_HEADS, DIM, generator=gen).to(dtype)
    positions = torch.arange(prefix, prefix + q_len)
    mask = None
    if prefix:
        mask = torch.arange(prefix + q_len)[None] <= positions[:, None]
    batch = AttentionBatch(
        positions, slots[prefix:], 0, None, None, None,
        [ExtendSpan(0, q_len, slots, mask)], k_cache, v_cache,
    )
    write_kv(0, k, v, batch)
    out = paged_attention(0, q, batch, DIM**-0.5)
    ref = _reference(q, k_cache[0][:, slots], v_cache[0][:, slots], prefix)
    assert out.dtype == dtype and out.shape == q.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < tolerance


def test_engine_steps_run_sdpa_without_cudnn_and_restore_the_flag(llama_path, monkeypatch) -> None:
    """cuDNN's SDPA plans every new length pair (tens of ms on an H100): engine steps leave it
    out, and only for their own duration (the flag is process-wide)."""
    from rollserve import Engine
    from rollserve.models import attention

    seen: list[bool] = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with Engine(str(llama_path), device="cpu", max_total_tokens=2048) as engine:
        engine.generate(input_ids=[[1, 2, 3], [4, 5, 6, 7, 8]],
                        sampling_params={"max_new_tokens": 4})
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
