"""The native prefill (extend) attention kernel computes what SDPA computes on the same
inputs, for plain causal spans and spans after a cached prefix, with K/V read from scattered
pool slots, in each build this CPU runs: bfloat16 on AVX512_BF16, float32 on AVX-512 and
AVX2. The engine uses it where it applies and keeps SDPA elsewhere."""

from __future__ import annotations

import pytest
import torch
from native_isas import HAS_COMPILER, ISAS

from rollserve import Engine
from rollserve.kernels.build import ISA_ENV, runnable_isas
from rollserve.kernels.prefill_attention import PrefillAttention, make_prefill_attention
from rollserve.models import attention
from rollserve.models.attention import AttentionBatch, ExtendSpan, paged_attention, write_kv

CPU = torch.device("cpu")
KV_HEADS, POOL = 2, 1500
HAS_KERNEL = (HAS_COMPILER and "avx512" in runnable_isas()
              and torch.cpu._is_avx512_bf16_supported())
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="the kernel needs AVX512_BF16")
BF16_BUILD = pytest.param(torch.bfloat16, "avx512", id="bf16-avx512", marks=needs_kernel)
# Every build this CPU runs: (dtype, isa).
BUILDS = [BF16_BUILD] + [
    pytest.param(torch.float32, *param.values, marks=param.marks, id=f"f32-{param.id}")
    for param in ISAS
]
# Both round float32 results to bfloat16; they differ in summation order and in the rounding
# of probabilities to bfloat16, by an ulp or two of the output. In float32 only the order of
# the sums and the exponential's last bits differ.
TOLERANCE = {torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
             torch.float32: dict(atol=2e-5, rtol=1e-4)}
MEAN_ERROR = {torch.bfloat16: 2e-3, torch.float32: 2e-6}


def _extend_inputs(q_len: int, prefix: int, heads: int, head_dim: int, seed: int,
                   dtype: torch.dtype = torch.bfloat16) -> tuple:
    """A layer of a pool holding the prefix's K/V in scattered slots, and this chunk's q, k,
    v; q is a view into a wider QKV-like buffer, as the model passes it."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(1, KV_HEADS, POOL, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(1, KV_HEADS, POOL, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(POOL, generator=gen)[: prefix + q_len]
    qkv = torch.randn(q_len, (heads + 2 * KV_HEADS) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : heads * head_dim].view(q_len, heads, head_dim)
    k = torch.randn(q_len, KV_HEADS, head_dim, generator=gen).to(dtype)
    v = torch.randn(q_len, KV_HEADS, head_dim, generator=gen).to(dtype)
    return q, k, v, k_cache, v_cache, slots


def _prefix_mask(q_len: int, prefix: int) -> torch.Tensor | None:
    if not prefix:
        return None
    return torch.arange(prefix + q_len)[None] <= torch.arange(prefix, prefix + q_len)[:, None]


def _attend(kernel: PrefillAttention | None, q, k, v, k_cache, v_cache, slots, prefix):
    """paged_attention over one extend span: through `kernel`, or SDPA when it is None."""
    q_len, head_dim = q.shape[0], q.shape[2]
    batch = AttentionBatch(
        torch.arange(prefix, prefix + q_len), slots[prefix:], 0, None, None, None,
        [ExtendSpan(0, q_len, slots, _prefix_mask(q_len, prefix))], k_cache.clone(),
        v_cache.clone(), extend_kernel=kernel,
    )
    write_kv(0, k, v, batch)
    return paged_attention(0, q, batch, head_dim**-0.5)


@pytest.mark.parametrize(("dtype", "isa"), BUILDS)
@pytest.mark.parametrize("q_len", [1, 7, 31, 32, 33, 288, 512])
@pytest.mark.parametrize("prefix", [0, 45])
@pytest.mark.parametrize(("head_dim", "group"),
                         [(64, 7), (64, 1), (64, 8), (128, 7), (96, 2), (32, 3)])
def test_kernel_equals_sdpa_on_causal_and_prefix_spans(
    q_len, prefix, head_dim, group, dtype, isa
) -> None:
    inputs = _extend_inputs(q_len, prefix, KV_HEADS * group, head_dim, q_len * 7 + prefix,
                            dtype)
    native = _attend(PrefillAttention(head_dim, group, dtype, isa), *inputs, prefix)
    sdpa = _attend(None, *inputs, prefix)
    assert native.dtype == dtype and native.shape == sdpa.shape
    torch.testing.assert_close(native.float(), sdpa.float(), **TOLERANCE[dtype])
    assert (native.float() - sdpa.float()).abs().mean() < MEAN_ERROR[dtype]


@pytest.mark.parametrize(("dtype", "isa"), BUILDS)
def test_kernel_matches_a_float64_reference_as_closely_as_sdpa(dtype, isa) -> None:
    q_len, prefix, group, head_dim = 150, 100, 7, 64
    q, k, v, k_cache, v_cache, slots = _extend_inputs(q_len, prefix, KV_HEADS * group,
                                                      head_dim, 3, dtype)
    native = _attend(PrefillAttention(head_dim, group, dtype, isa), q, k, v, k_cache, v_cache,
                     slots, prefix)
    sdpa = _attend(None, q, k, v, k_cache, v_cache, slots, prefix)
    keys, values = k_cache[0].clone(), v_cache[0].clone()
    keys[:, slots[prefix:]], values[:, slots[prefix:]] = k.transpose(0, 1), v.transpose(0, 1)
    keys = keys[:, slots].double().repeat_interleave(group, 0)
    values = values[:, slots].double().repeat_interleave(group, 0)
    scores = torch.einsum("qhd,hkd->hqk", q.double(), keys) * head_dim**-0.5
    scores = scores.masked_fill(~_prefix_mask(q_len, prefix), float("-inf"))
    ref = torch.einsum("hqk,hkd->qhd", torch.softmax(scores, -1), values)
    error = lambda out: ((out.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert error(native) < max(1.2 * error(sdpa), 5e-3 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize(("dtype", "isa"), BUILDS)
def test_kernel_writes_only_its_rows_of_out(dtype, isa) -> None:
    q, _, _, k_cache, v_cache, slots = _extend_inputs(20, 5, KV_HEADS * 7, 64, 11, dtype)
    out = torch.full((30, KV_HEADS * 7, 64), 7.0, dtype=dtype)
    kernel = PrefillAttention(64, 7, dtype, isa)
    returned = kernel(q, k_cache[0], v_cache[0], slots, 0.125, out[4:24])
    assert returned.data_ptr() == out[4:24].data_ptr()
    assert torch.equal(returned, kernel(q.contiguous(), k_cache[0], v_cache[0], slots, 0.125))
    assert torch.all(out[:4] == 7.0) and torch.all(out[24:] == 7.0)


@needs_kernel
def test_kernel_refuses_tensors_it_was_not_built_for() -> None:
    kernel = PrefillAttention(64, 7)
    q = torch.ones(5, 14, 64, dtype=torch.bfloat16)
    pool = torch.ones(2, 10, 64, dtype=torch.bfloat16)
    slots = torch.arange(5)
    with pytest.raises(ValueError, match="head layout"):
        kernel(torch.ones(5, 12, 64, dtype=torch.bfloat16), pool, pool, slots, 0.125)
    with pytest.raises(ValueError, match="q, k, v"):
        kernel(q.float(), pool.float(), pool.float(), slots, 0.125)
    with pytest.raises(ValueError, match="layout"):
        kernel(q, pool.transpose(0, 1).contiguous().transpose(0, 1), pool, slots, 0.125)
    with pytest.raises(ValueError, match="kv_slots"):
        kernel(q, pool, pool, slots[:4], 0.125)


def test_there_is_no_bf16_kernel_for_avx2() -> None:
    with pytest.raises(ValueError, match=r"kernel for torch\.bfloat16 on avx2"):
        PrefillAttention(64, 7, torch.bfloat16, "avx2")


def test_kernel_applies_to_bf16_with_avx512_bf16_and_to_float32_with_any_isa(
    monkeypatch
) -> None:
    monkeypatch.delenv(ISA_ENV, raising=False)  # the CPU's own choice first (a run may force one)
    isas = runnable_isas()
    assert make_prefill_attention(CPU, torch.float16, 64, 7) is None
    assert make_prefill_attention(CPU, torch.bfloat16, 48, 7) is None  # no multiple of 32
    assert make_prefill_attention(CPU, torch.float32, 48, 7) is None
    assert make_prefill_attention(torch.device("cuda"), torch.bfloat16, 64, 7) is None
    assert (make_prefill_attention(CPU, torch.bfloat16, 64, 7) is not None) == HAS_KERNEL
    float32 = make_prefill_attention(CPU, torch.float32, 64, 7)
    assert (float32.isa if float32 else None) == (isas[0] if isas and HAS_COMPILER else None)
    monkeypatch.setenv(ISA_ENV, "none")
    assert make_prefill_attention(CPU, torch.bfloat16, 64, 7) is None
    assert make_prefill_attention(CPU, torch.float32, 64, 7) is None
    if "avx2" in isas:
        monkeypatch.setenv(ISA_ENV, "avx2")
        assert make_prefill_attention(CPU, torch.bfloat16, 64, 7) is None
        float32 = make_prefill_attention(CPU, torch.float32, 64, 7)
        assert (float32.isa if float32 else None) == ("avx2" if HAS_COMPILER else None)
    monkeypatch.delenv(ISA_ENV)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert make_prefill_attention(CPU, torch.bfloat16, 64, 7) is None


def _prefill_paths(path: str, dtype: str, monkeypatch,
                   **options) -> tuple[list[str], list[float]]:
    """Which path each extend span took in a short generation (with prompts long enough
    for a 16-token chunk to extend a cached prefix), and the prompts' input logprobs."""
    taken: list[str] = []
    kernel_call, sdpa = PrefillAttention.__call__, attention.F.scaled_dot_product_attention

    def native(self, *args, **kwargs):
        taken.append(f"kernel-{self.isa}")
        return kernel_call(self, *args, **kwargs)

    def fallback(*args, **kwargs):
        taken.append("sdpa")
        return sdpa(*args, **kwargs)

    prompts = [[(7 * i + 3 * j) % 50 + 1 for j in range(20 + 9 * i)] for i in range(3)]
    with monkeypatch.context() as patch:
        patch.setattr(PrefillAttention, "__call__", native)
        patch.setattr(attention.F, "scaled_dot_product_attention", fallback)
        with Engine(path, dtype=dtype, device="cpu", max_total_tokens=2048,
                    chunked_prefill_size=16, **options) as engine:
            outs = engine.generate(
                input_ids=prompts, return_logprob=True, logprob_start_len=0,
                sampling_params={"temperature": 0.0, "max_new_tokens": 2},
            )
    logprobs = [lp[0] for out in outs for lp in out["meta_info"]["input_token_logprobs"][1:]]
    return taken, logprobs


@pytest.mark.parametrize(("dtype", "isa"), BUILDS)
def test_engine_prefills_through_the_kernel_with_sdpas_logprobs(
    tiny_model_factory, monkeypatch, caplog, dtype, isa
) -> None:
    path = str(tiny_model_factory("qwen3"))  # head_dim 32, two query heads per KV head
    name = str(dtype).removeprefix("torch.")
    monkeypatch.setenv(ISA_ENV, isa)
    with caplog.at_level("INFO", logger="rollserve"):
        taken, native = _prefill_paths(path, name, monkeypatch)
    assert taken and set(taken) == {f"kernel-{isa}"}
    assert "native CPU kernels: decode attention, prefill attention," in caplog.text
    monkeypatch.setenv(ISA_ENV, "none")
    taken, sdpa = _prefill_paths(path, name, monkeypatch)
    assert taken and set(taken) == {"sdpa"}
    largest = max(abs(a - b) for a, b in zip(native, sdpa, strict=True))
    assert largest < (0.1 if dtype == torch.bfloat16 else 1e-4)


def test_engine_keeps_sdpa_with_native_kernels_disabled(tiny_model_factory, monkeypatch) -> None:
    path = str(tiny_model_factory("qwen3"))
    monkeypatch.delenv(ISA_ENV, raising=False)
    taken, _ = _prefill_paths(path, "float32", monkeypatch, disable_native_kernels=True)
    assert taken and set(taken) == {"sdpa"}
