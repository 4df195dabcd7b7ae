"""The native CPU decode-attention kernel computes the same attention as a float64 reference,
and the engine gives the same tokens with it as with the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from rollserve import Engine
from rollserve.kernels.decode_attention import DecodeAttention, make_decode_attention

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(
    make_decode_attention(CPU, torch.float32, 64, 2) is None,
    reason="no AVX-512 CPU or no C compiler: the engine uses the PyTorch path",
)


def _reference(q, k, v, slots, lens, scale) -> torch.Tensor:
    n, heads, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    out = torch.empty(n, heads, dim, dtype=torch.float64)
    for i in range(n):
        rows = slots[i, : lens[i]]
        for g in range(kv_heads):
            heads_of_g = slice(g * group, (g + 1) * group)
            probs = torch.softmax(q[i, heads_of_g].double() @ k[g, rows].double().T * scale, -1)
            out[i, heads_of_g] = probs @ v[g, rows].double()
    return out


@needs_kernel
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("head_dim", "group", "kv_heads"), [(16, 2, 2), (64, 7, 2), (128, 1, 3)])
def test_kernel_matches_float64_reference(dtype, tolerance, head_dim, group, kv_heads) -> None:
    gen = torch.Generator().manual_seed(head_dim + group)
    n, pool_slots = 11, 2000
    k = torch.randn(kv_heads, pool_slots, head_dim, generator=gen).to(dtype)
    v = torch.randn(kv_heads, pool_slots, head_dim, generator=gen).to(dtype)
    q = torch.randn(n, kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.randint(1, 200, (n,), generator=gen)
    lens[:3] = torch.tensor([1, 16, 17])  # one key, a full 16-lane block, one past it
    slots = torch.randint(1, pool_slots, (n, int(lens.max())), generator=gen)
    out = DecodeAttention(head_dim, group, dtype)(q, k, v, slots, lens, head_dim**-0.5)
    ref = _reference(q, k, v, slots, lens, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < tolerance


def test_kernel_is_not_used_where_it_does_not_apply() -> None:
    assert make_decode_attention(CPU, torch.float16, 64, 2) is None
    assert make_decode_attention(CPU, torch.float32, 24, 2) is None  # not a multiple of 16
    assert make_decode_attention(torch.device("cuda"), torch.float32, 64, 2) is None


@needs_kernel
def test_engine_tokens_and_logprobs_equal_with_kernel_and_torch_path(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2")
    prompts = [[7 + i, 19, 33 + 2 * i][: 1 + i % 3] * (2 + i) for i in range(12)]
    params = {"temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True}
    results = {}
    for backend in ("auto", "torch"):
        with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=4096,
                    attention_backend=backend) as engine:
            assert (engine.scheduler.runner.decode_kernel is not None) == (backend == "auto")
            results[backend] = engine.generate(
                input_ids=prompts, sampling_params=params, return_logprob=True
            )
    for native, torch_path in zip(results["auto"], results["torch"], strict=True):
        assert native["output_ids"] == torch_path["output_ids"]
        pairs = zip(native["meta_info"]["output_token_logprobs"],
                    torch_path["meta_info"]["output_token_logprobs"], strict=True)
        assert max(abs(a[0] - b[0]) for a, b in pairs) < 1e-4


def test_unknown_attention_backend_is_refused(tiny_model_factory) -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(str(tiny_model_factory("qwen2")), device="cpu", attention_backend="flash")
