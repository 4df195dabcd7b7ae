"""The native CPU kernels compute what the eager PyTorch path computes: decode attention against a
float64 reference, the fused norms, SwiGLU and rotary (with the K/V write) against the eager ops
they replace, and the engine gives the same tokens with them as without them. Every kernel test runs
for each instruction set this CPU runs (native_isas.ISAS)."""

from __future__ import annotations

import pytest
import torch
from native_isas import ISAS

from rollserve import Engine
from rollserve.kernels.amx_linear import make_amx_linear
from rollserve.kernels.build import (
    ISA_ENV,
    UnsupportedIsa,
    runnable_isas,
    selected_isa,
    why_not_native,
)
from rollserve.kernels.decode_attention import DecodeAttention, make_decode_attention
from rollserve.kernels.decode_layers import LayerShape, make_decode_layers
from rollserve.kernels.elementwise import FusedElementwise, make_fused_elementwise
from rollserve.kernels.sampling import make_native_sampling
from rollserve.models.llama import RMSNorm
from rollserve.models.rope import apply_rotary

CPU = torch.device("cpu")
DTYPES = [torch.bfloat16, torch.float32]


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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    ("head_dim", "group", "kv_heads"), [(16, 2, 2), (64, 7, 2), (128, 4, 2), (128, 1, 3)]
)
def test_kernel_matches_float64_reference(isa, dtype, tolerance, head_dim, group, kv_heads) -> None:
    gen = torch.Generator().manual_seed(head_dim + group)
    n, pool_slots = 12, 2000
    k = torch.randn(kv_heads, pool_slots, head_dim, generator=gen).to(dtype)
    v = torch.randn(kv_heads, pool_slots, head_dim, generator=gen).to(dtype)
    q = torch.randn(n, kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.randint(1, 200, (n,), generator=gen)
    # one key; around 16-lane blocks, and 32-key steps of the bf16-pair path (odd counts
    # leave a key without a partner)
    lens[:8] = torch.tensor([1, 2, 16, 17, 31, 32, 33, 63])
    slots = torch.randint(1, pool_slots, (n, int(lens.max())), generator=gen)
    out = DecodeAttention(head_dim, group, dtype, isa)(q, k, v, slots, lens, head_dim**-0.5)
    ref = _reference(q, k, v, slots, lens, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    for row, (got, want) in enumerate(zip(out.double(), ref, strict=True)):
        assert ((got - want).norm() / want.norm()).item() < tolerance, f"sequence {row}"


def _assert_close_to_eager(fused: torch.Tensor, eager: torch.Tensor) -> None:
    """Equal but for last-bit differences (summation order of the RMS, exp's last bit): in
    bfloat16 these rarely move a rounding, so nearly every element is identical; in float32
    they show as a few ulps."""
    assert fused.dtype == eager.dtype and fused.shape == eager.shape
    ulps = 1 if eager.dtype == torch.bfloat16 else 4
    step = torch.finfo(eager.dtype).eps * ulps
    assert torch.all((fused - eager).abs() <= eager.abs() * step + 1e-6)
    if eager.dtype == torch.bfloat16:
        assert (fused == eager).float().mean() > 0.99


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_matches_eager(isa, dtype, with_residual) -> None:
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(200, 1e-6).to(dtype)  # 200: a partial last 16-lane block
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200, generator=gen) + 0.5)
    x = torch.randn(37, 200, generator=gen).to(dtype)
    residual = torch.randn(37, 200, generator=gen).to(dtype) if with_residual else None
    eager_residual = None if residual is None else residual.clone()
    eager = norm(x.clone(), eager_residual)
    norm.fused = FusedElementwise(dtype, isa)
    fused = norm(x, residual)
    _assert_close_to_eager(fused, eager)
    if with_residual:
        assert torch.equal(residual, eager_residual)  # the sum is rounded once, like add_


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_silu_and_mul_matches_eager(isa, dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    gate = (torch.randn(29, 120, generator=gen) * 4).to(dtype)
    up = torch.randn(29, 120, generator=gen).to(dtype)
    eager = torch.nn.functional.silu(gate) * up
    fused = FusedElementwise(dtype, isa).silu_and_mul(torch.cat([gate, up], dim=-1))
    _assert_close_to_eager(fused, eager)


def _rotary_inputs(dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int,
                   tokens: int = 13) -> tuple:
    """q, k, v as views into one qkv projection output (rows apart, heads contiguous), cos
    and sin, a one-layer pool and scattered slots for the tokens."""
    gen = torch.Generator().manual_seed(head_dim + heads)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    angles = torch.rand(tokens, 1, head_dim, generator=gen) * 6
    pool = torch.randn(2, kv_heads, 40, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(40, generator=gen)[:tokens]
    return (qkv, q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
            v.view(tokens, kv_heads, head_dim), angles.cos().to(dtype), angles.sin().to(dtype),
            pool, slots)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])  # 24: half a row is no whole block
def test_fused_rotary_and_kv_write_equal_eager_rotary_and_index_put(isa, dtype, head_dim) -> None:
    qkv, q, k, v, cos, sin, pool, slots = _rotary_inputs(dtype, head_dim, 6, 2)
    before, expected = qkv.clone(), pool.clone()
    expected[0][:, slots] = apply_rotary(k.clone(), cos, sin).transpose(0, 1)
    expected[1][:, slots] = v.transpose(0, 1)
    eager_q = apply_rotary(q.clone(), cos, sin)
    fused_q = FusedElementwise(dtype, isa).rotary_store_kv(q, k, v, cos, sin, pool[0], pool[1],
                                                          slots)
    # No reduction: the same roundings in the same order, so the same bits.
    assert fused_q.data_ptr() == q.data_ptr() and torch.equal(fused_q, eager_q)
    assert torch.equal(pool, expected)  # the tokens' slots written, every other slot kept
    head_rows = q.shape[1] * head_dim
    assert torch.equal(qkv[:, head_rows:], before[:, head_rows:])  # k and v left as they were


@pytest.mark.parametrize("isa", ISAS)
def test_fused_rotary_and_kv_write_refuse_mismatched_tensors(isa) -> None:
    fused = FusedElementwise(torch.float32, isa)
    _, q, k, v, cos, sin, pool, slots = _rotary_inputs(torch.float32, 32, 4, 2)
    with pytest.raises(ValueError, match="slots"):
        fused.rotary_store_kv(q, k, v, cos, sin, pool[0], pool[1], slots[:5])
    with pytest.raises(ValueError, match="slots"):
        fused.rotary_store_kv(q, k, v, cos, sin, pool[0], pool[1], slots.int())
    with pytest.raises(ValueError, match="shapes"):
        fused.rotary_store_kv(q, k, v, cos, sin, pool[0][:1], pool[1][:1], slots)
    with pytest.raises(ValueError, match="dtype"):
        fused.rotary_store_kv(q, k, v, cos, sin, pool[0].double(), pool[1].double(), slots)
    with pytest.raises(ValueError, match="shapes"):  # a pool of another head size
        fused.rotary_store_kv(q, k, v, cos, sin, pool[0][..., :16].contiguous(),
                              pool[1][..., :16].contiguous(), slots)
    for outside in (40, -1):
        with pytest.raises(ValueError, match="slots outside the pool"):
            fused.rotary_store_kv(q, k, v, cos, sin, pool[0], pool[1],
                                  torch.cat([slots[:-1], torch.tensor([outside])]))


def test_kernels_are_not_used_where_they_do_not_apply() -> None:
    assert make_decode_attention(CPU, torch.float16, 64, 2) is None
    assert make_decode_attention(CPU, torch.float32, 24, 2) is None  # not a multiple of 16
    assert make_decode_attention(torch.device("cuda"), torch.float32, 64, 2) is None
    assert make_fused_elementwise(CPU, torch.float16) is None
    assert make_fused_elementwise(torch.device("cuda"), torch.bfloat16) is None
    assert make_native_sampling(torch.device("cuda")) is None


# exp() overflows, underflows and saturates here: -88.5 needs 2^128 in exp(88.5)'s scaling.
EXTREMES = [-100.0, -88.75, -88.5, -87.6, -20.0, -0.0, 0.0, 1e-40, 3.0, 88.5, 100.0,
            float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_silu_and_mul_keeps_eager_results_at_the_extremes(isa, dtype) -> None:
    gate = torch.tensor(EXTREMES).repeat(3, 1).to(dtype)  # 14 lanes: a tail on both ISAs
    up = torch.ones_like(gate)
    fused = FusedElementwise(dtype, isa).silu_and_mul(torch.cat([gate, up], dim=-1))
    eager = torch.nn.functional.silu(gate) * up
    step = torch.finfo(dtype).eps * (1 if dtype == torch.bfloat16 else 4)
    torch.testing.assert_close(fused, eager, rtol=step, atol=0, equal_nan=True)


@pytest.mark.skipif(len(runnable_isas()) < 2, reason="this CPU runs one ISA at most")
@pytest.mark.parametrize("dtype", DTYPES)
def test_avx2_and_avx512_builds_give_the_same_bits_where_nothing_is_summed(dtype) -> None:
    """simd.h's two implementations agree lane for lane, exp() included: only sums across
    lanes (RMS, softmax, scores) may differ in their last bits."""
    gen = torch.Generator().manual_seed(6)
    gate = torch.cat([torch.randn(5, 14, generator=gen) * 30, torch.tensor([EXTREMES])])
    gate, up = gate.to(dtype), torch.randn(6, 14, generator=gen).to(dtype)
    _, q, k, v, cos, sin, pool, slots = _rotary_inputs(dtype, 48, 3, 1)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    outputs = []
    for isa in runnable_isas():
        fused, written = FusedElementwise(dtype, isa), pool.clone()
        rotated = fused.rotary_store_kv(q.clone(), k, v, cos, sin, written[0], written[1], slots)
        outputs.append((fused.silu_and_mul(torch.cat([gate, up], dim=-1)).view(bits),
                        rotated.view(bits), written.view(bits)))
    for output in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(output, outputs[0], strict=True))


@pytest.mark.parametrize("isa", ISAS)
def test_engine_tokens_and_logprobs_equal_with_and_without_native_kernels(
    isa, tiny_model_factory, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(ISA_ENV, isa)
    path = tiny_model_factory("qwen2")
    prompts = [[7 + i, 19, 33 + 2 * i][: 1 + i % 3] * (2 + i) for i in range(12)]
    params = {"temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True}
    results = {}
    for disabled in (False, True):
        with caplog.at_level("INFO", logger="rollserve"), Engine(
            str(path), dtype="float32", device="cpu", max_total_tokens=4096,
            disable_native_kernels=disabled,
        ) as engine:
            assert (engine.scheduler.runner.forward.decode_kernel is None) == disabled
            assert (engine.scheduler.native_sampling is None) == disabled
            assert (engine.model.model.norm.fused is None) == disabled
            assert (engine.model.model.native_decode is None) == disabled
            results[disabled] = engine.generate(
                input_ids=prompts, sampling_params=params, return_logprob=True
            )
    for native, torch_path in zip(results[False], results[True], strict=True):
        assert native["output_ids"] == torch_path["output_ids"]
        pairs = zip(native["meta_info"]["output_token_logprobs"],
                    torch_path["meta_info"]["output_token_logprobs"], strict=True)
        assert max(abs(a[0] - b[0]) for a, b in pairs) < 1e-4
    assert ("native CPU kernels: decode attention, fused elementwise, sampling, decode layers "
            f"({isa} build)") in caplog.text


@pytest.mark.parametrize("isa", ISAS)
def test_kernels_refuse_tensors_they_were_not_built_for(isa) -> None:
    fused = FusedElementwise(torch.float32, isa)
    with pytest.raises(ValueError, match="dtype"):
        fused.silu_and_mul(torch.ones(2, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="layout"):
        fused.silu_and_mul(torch.ones(32, 2).t())
    with pytest.raises(ValueError, match="gate and up halves"):
        fused.silu_and_mul(torch.ones(2, 33))
    ones = torch.ones(4, 1, 16)
    with pytest.raises(ValueError, match="layout"):
        fused.rotary_store_kv(torch.ones(3, 4, 16).transpose(0, 1), ones, ones, ones, ones,
                              torch.ones(1, 8, 16), torch.ones(1, 8, 16), torch.arange(4))
    attention = DecodeAttention(16, 2, torch.float32, isa)
    k = torch.ones(2, 10, 16)
    with pytest.raises(ValueError, match="head layout"):
        attention(torch.ones(1, 3, 16), k, k, torch.ones(1, 4, dtype=torch.int64),
                  torch.ones(1, dtype=torch.int64), 0.25)


@pytest.mark.parametrize(("capability", "isa"), [
    ("AVX512", "avx512"), ("AVX2", "avx2"), ("DEFAULT", None), ("NO AVX", None),
])
def test_the_kernels_are_built_for_the_best_isa_the_cpu_runs(capability, isa, monkeypatch) -> None:
    monkeypatch.delenv(ISA_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert selected_isa() == isa


def test_forcing_an_isa_the_cpu_lacks_is_refused_with_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv(ISA_ENV, "avx512")
    with pytest.raises(UnsupportedIsa, match="ROLLSERVE_CPU_ISA=avx512 but this CPU offers AVX2"):
        make_decode_attention(CPU, torch.float32, 64, 2)
    monkeypatch.setenv(ISA_ENV, "sse4")
    with pytest.raises(UnsupportedIsa, match="expected one of avx512, avx2, none"):
        make_fused_elementwise(CPU, torch.float32)


def test_isa_none_keeps_every_pytorch_path_and_says_why(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv(ISA_ENV, "none")
    assert make_decode_attention(CPU, torch.bfloat16, 64, 2) is None
    assert make_fused_elementwise(CPU, torch.bfloat16) is None
    assert make_native_sampling(CPU) is None
    assert make_amx_linear(CPU, torch.bfloat16) is None
    assert why_not_native(CPU, torch.bfloat16) == "ROLLSERVE_CPU_ISA=none"


@pytest.mark.skipif(not runnable_isas(), reason="no AVX2 here: no compiler is asked for")
@pytest.mark.parametrize("isa", runnable_isas())
def test_without_a_compiler_the_engine_falls_back_and_says_so(
    isa, tiny_model_factory, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(ISA_ENV, isa)
    monkeypatch.setenv("ROLLSERVE_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "no-such-compiler")
    with caplog.at_level("WARNING"):
        assert make_decode_attention(CPU, torch.float32, 64, 2) is None
        assert make_fused_elementwise(CPU, torch.float32) is None
        assert make_native_sampling(CPU) is None
        assert make_amx_linear(CPU, torch.bfloat16) is None
        assert make_decode_layers(CPU, torch.float32, LayerShape(64, 128, 2, 2, 16, False)) is None
    assert "no C compiler ('no-such-compiler')" in caplog.text
    with Engine(str(tiny_model_factory("qwen2")), dtype="float32", device="cpu",
                max_total_tokens=1024) as engine:
        assert engine.scheduler.runner.forward.decode_kernel is None
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})
    assert len(out["output_ids"]) == 4


def _greedy_tokens(path: str, **options: object) -> list[int]:
    with Engine(path, dtype="float32", device="cpu", max_total_tokens=1024, **options) as engine:
        out = engine.generate(input_ids=[1, 2, 3],
                              sampling_params={"temperature": 0.0, "max_new_tokens": 8})
    return out["output_ids"]


@pytest.mark.skipif("avx2" not in runnable_isas(), reason="this CPU does not run AVX2")
def test_an_avx2_only_cpu_runs_the_avx2_kernels_with_the_pytorch_paths_tokens(
    tiny_model_factory, monkeypatch, caplog
) -> None:
    """An AVX-512 machine plays an AVX2-only CPU here (torch's capability report is what
    the kernels consult): the AVX2 builds run, AMX does not."""
    path = str(tiny_model_factory("qwen2"))
    expected = _greedy_tokens(path, disable_native_kernels=True)
    monkeypatch.delenv(ISA_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert make_amx_linear(CPU, torch.bfloat16) is None
    with caplog.at_level("INFO", logger="rollserve"):
        assert _greedy_tokens(path) == expected
    assert ("native CPU kernels: decode attention, fused elementwise, sampling, decode layers "
            "(avx2 build)") in caplog.text


def test_on_a_cpu_with_neither_avx2_nor_avx512_the_engine_runs_the_pytorch_path_and_says_why(
    tiny_model_factory, monkeypatch, caplog
) -> None:
    """Any machine plays a CPU without AVX2 here, so the fallback is checked on every CPU
    the suite runs on."""
    path = str(tiny_model_factory("qwen2"))
    expected = _greedy_tokens(path, disable_native_kernels=True)
    monkeypatch.delenv(ISA_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with caplog.at_level("INFO", logger="rollserve"):
        assert _greedy_tokens(path) == expected
    assert ("native CPU kernels: none (they need AVX2 or AVX-512 and this CPU offers DEFAULT)"
            in caplog.text)
