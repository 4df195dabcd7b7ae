"""The native CPU kernels compute what the eager PyTorch path computes: decode attention
against a float64 reference, the fused norms, SwiGLU and rotary against the eager ops they
replace, and the engine gives the same tokens with them as without them."""

from __future__ import annotations

import pytest
import torch

from rollserve import Engine
from rollserve.kernels.amx_linear import make_amx_linear
from rollserve.kernels.build import kernels_apply
from rollserve.kernels.decode_attention import DecodeAttention, make_decode_attention
from rollserve.kernels.elementwise import make_fused_elementwise
from rollserve.kernels.sampling import make_native_sampling
from rollserve.models.llama import RMSNorm
from rollserve.models.rope import apply_rotary

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(
    make_decode_attention(CPU, torch.float32, 64, 2) is None,
    reason="no AVX-512 CPU or no C compiler: the engine uses the PyTorch path",
)
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


@needs_kernel
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    ("head_dim", "group", "kv_heads"), [(16, 2, 2), (64, 7, 2), (128, 4, 2), (128, 1, 3)]
)
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


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_matches_eager(dtype, with_residual) -> None:
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(200, 1e-6).to(dtype)  # 200: a partial last 16-lane block
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200, generator=gen) + 0.5)
    x = torch.randn(37, 200, generator=gen).to(dtype)
    residual = torch.randn(37, 200, generator=gen).to(dtype) if with_residual else None
    eager_residual = None if residual is None else residual.clone()
    eager = norm(x.clone(), eager_residual)
    norm.fused = make_fused_elementwise(CPU, dtype)
    fused = norm(x, residual)
    _assert_close_to_eager(fused, eager)
    if with_residual:
        assert torch.equal(residual, eager_residual)  # the sum is rounded once, like add_


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_silu_mul_matches_eager(dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    gate = (torch.randn(29, 120, generator=gen) * 4).to(dtype)
    up = torch.randn(29, 120, generator=gen).to(dtype)
    eager = torch.nn.functional.silu(gate) * up
    fused = make_fused_elementwise(CPU, dtype).silu_mul(gate.clone(), up)
    _assert_close_to_eager(fused, eager)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_fused_rotary_equals_eager(dtype, head_dim) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(13, 6, head_dim, generator=gen).to(dtype)
    angles = torch.rand(13, 1, head_dim, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    eager = apply_rotary(x.clone(), cos, sin)
    fused = make_fused_elementwise(CPU, dtype).rotary(x.clone(), cos, sin)
    assert torch.equal(fused, eager)  # no reduction: the same roundings in the same order


def test_kernels_are_not_used_where_they_do_not_apply() -> None:
    assert make_decode_attention(CPU, torch.float16, 64, 2) is None
    assert make_decode_attention(CPU, torch.float32, 24, 2) is None  # not a multiple of 16
    assert make_decode_attention(torch.device("cuda"), torch.float32, 64, 2) is None
    assert make_fused_elementwise(CPU, torch.float16) is None
    assert make_fused_elementwise(torch.device("cuda"), torch.bfloat16) is None
    assert make_native_sampling(torch.device("cuda")) is None


@needs_kernel
def test_engine_tokens_and_logprobs_equal_with_and_without_native_kernels(
    tiny_model_factory,
) -> None:
    path = tiny_model_factory("qwen2")
    prompts = [[7 + i, 19, 33 + 2 * i][: 1 + i % 3] * (2 + i) for i in range(12)]
    params = {"temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True}
    results = {}
    for disabled in (False, True):
        with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=4096,
                    disable_native_kernels=disabled) as engine:
            assert (engine.scheduler.runner.decode_kernel is None) == disabled
            assert (engine.scheduler.native_sampling is None) == disabled
            assert (engine.model.model.norm.fused is None) == disabled
            results[disabled] = engine.generate(
                input_ids=prompts, sampling_params=params, return_logprob=True
            )
    for native, torch_path in zip(results[False], results[True], strict=True):
        assert native["output_ids"] == torch_path["output_ids"]
        pairs = zip(native["meta_info"]["output_token_logprobs"],
                    torch_path["meta_info"]["output_token_logprobs"], strict=True)
        assert max(abs(a[0] - b[0]) for a, b in pairs) < 1e-4


@needs_kernel
def test_kernels_refuse_tensors_they_were_not_built_for() -> None:
    fused = make_fused_elementwise(CPU, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        fused.silu_mul(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(2, 16))
    with pytest.raises(ValueError, match="layout"):
        fused.silu_mul(torch.ones(16, 2).t(), torch.ones(2, 16))
    attention = DecodeAttention(16, 2, torch.float32)
    k = torch.ones(2, 10, 16)
    with pytest.raises(ValueError, match="head layout"):
        attention(torch.ones(1, 3, 16), k, k, torch.ones(1, 4, dtype=torch.int64),
                  torch.ones(1, dtype=torch.int64), 0.25)


@pytest.mark.skipif(not kernels_apply(CPU, torch.float32),
                    reason="no AVX-512 here: the kernels never ask for a compiler")
def test_without_a_compiler_the_engine_falls_back_and_says_so(
    tiny_model_factory, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("ROLLSERVE_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "no-such-compiler")
    with caplog.at_level("WARNING"):
        assert make_decode_attention(CPU, torch.float32, 64, 2) is None
        assert make_fused_elementwise(CPU, torch.float32) is None
        assert make_native_sampling(CPU) is None
        assert make_amx_linear(CPU, torch.bfloat16) is None
    assert "no C compiler ('no-such-compiler')" in caplog.text
    with Engine(str(tiny_model_factory("qwen2")), dtype="float32", device="cpu",
                max_total_tokens=1024) as engine:
        assert engine.scheduler.runner.decode_kernel is None
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})
    assert len(out["output_ids"]) == 4


def test_on_a_cpu_without_avx512_the_engine_runs_the_pytorch_path_and_says_why(
    tiny_model_factory, monkeypatch, caplog
) -> None:
    """Any machine plays an AVX2-only CPU here (torch's capability report is what the
    kernels consult), so the fallback is checked on every CPU the suite runs on."""
    path = str(tiny_model_factory("qwen2"))
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    options = {"dtype": "float32", "device": "cpu", "max_total_tokens": 1024}
    with Engine(path, disable_native_kernels=True, **options) as engine:
        expected = engine.generate(input_ids=[1, 2, 3], sampling_params=greedy)["output_ids"]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level("INFO", logger="rollserve"), Engine(path, **options) as engine:
        assert engine.scheduler.runner.decode_kernel is None
        out = engine.generate(input_ids=[1, 2, 3], sampling_params=greedy)
    assert out["output_ids"] == expected
    assert "native CPU kernels: none (they need AVX-512 and this CPU offers AVX2)" in caplog.text
