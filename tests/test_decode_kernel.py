"""The C++ paged decode-attention kernel equals the PyTorch decode path."""

from __future__ import annotations

import pytest
import torch

from rollserve.models.attention import AttentionBatch, _attend_decode
from rollserve.models.cpu_kernels import decode_attention_kernel


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_the_pytorch_decode_path(dtype: torch.dtype, tolerance: float) -> None:
    kernel = decode_attention_kernel()
    if kernel is None:
        pytest.skip("the C++ kernel could not be built on this machine")
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, pool = 5, 6, 2, 32, 200
    k_cache = torch.randn(kv_heads, pool, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, pool, dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 7, 30, 12, 30])
    slots = torch.randint(1, pool, (batch, 30), generator=gen)
    padding = (torch.arange(30)[None, :] >= lens[:, None])[:, None, :]
    slots = slots.masked_fill(padding[:, 0], 0)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    attention = AttentionBatch(torch.zeros(0), torch.zeros(0), batch, slots, padding, lens,
                               None, [], k_cache[None], v_cache[None])
    reference = _attend_decode(q, k_cache, v_cache, attention, dim**-0.5)
    result = kernel(q, k_cache, v_cache, slots, lens, dim**-0.5)
    assert (result.float() - reference.float()).abs().max().item() < tolerance
