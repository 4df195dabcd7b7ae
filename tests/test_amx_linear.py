"""The AMX few-row linear: bf16-accurate against float64, rows independent of the batch,
used by Linear only where it applies, and absent where the CPU or dtype does not allow it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollserve import Engine
from rollserve.kernels.amx_linear import MAX_ROWS, make_amx_linear
from rollserve.kernels.build import ISA_ENV, runnable_isas
from rollserve.models.linear import Linear

CPU = torch.device("cpu")
AMX = make_amx_linear(CPU, torch.bfloat16)
needs_amx = pytest.mark.skipif(AMX is None, reason="no AMX-BF16 CPU or no C compiler")


def _inputs(rows: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=generator).to(torch.bfloat16)
    return x, weight, bias


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (144, 896)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_amx_linear_matches_float64_within_bf16_rounding(
    rows: int, n: int, k: int, with_bias: bool
) -> None:
    x, weight, bias = _inputs(rows, n, k)
    bias = bias if with_bias else None
    out = AMX(x, weight, bias).double()
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    # One bf16 rounding of the result, plus float32 accumulation error over k terms.
    bound = exact.abs() * 2**-8 + (x.double().abs() @ weight.double().abs().T) * k * 2**-23
    assert (out - exact).abs().le(bound + 1e-6).all()


@needs_amx
def test_amx_linear_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    x, weight, bias = _inputs(29, 160, 224)
    batched = AMX(x, weight, bias)
    for row in (0, 15, 16, 28):
        assert torch.equal(AMX(x[row : row + 1], weight, bias)[0], batched[row])


@needs_amx
def test_linear_routes_few_bf16_rows_to_amx_and_wider_ones_to_onednn() -> None:
    layer = Linear(96, 48, bias=True).to(torch.bfloat16)
    layer.repack()
    layer.amx = AMX
    few, wide = _inputs(MAX_ROWS, 48, 96)[0], _inputs(MAX_ROWS + 1, 48, 96)[0]
    with torch.no_grad():
        assert torch.equal(layer(few), AMX(few, layer.weight, layer.bias))
        assert torch.equal(layer(wide), F.linear(wide, layer.weight, layer.bias))


@needs_amx
def test_amx_linear_refuses_what_it_was_not_built_for() -> None:
    x, weight, bias = _inputs(4, 48, 96)
    with pytest.raises(ValueError, match="rows, dtype or shape"):
        AMX(x.float(), weight)
    with pytest.raises(ValueError, match="rows, dtype or shape"):
        AMX(x[:, :80], weight[:, :80])  # k not a multiple of 32
    with pytest.raises(ValueError, match="weight"):
        AMX(x, weight.t().contiguous().t())
    with pytest.raises(ValueError, match="bias"):
        AMX(x, weight, bias[:40])
    assert not AMX.serves(_inputs(MAX_ROWS + 1, 48, 96)[0], weight)


def test_amx_linear_is_not_used_where_it_does_not_apply() -> None:
    assert make_amx_linear(CPU, torch.float32) is None
    assert make_amx_linear(CPU, torch.float16) is None
    assert make_amx_linear(torch.device("cuda"), torch.bfloat16) is None


@pytest.mark.skipif("avx2" not in runnable_isas(), reason="this CPU does not run AVX2")
def test_amx_linear_is_not_used_when_the_avx2_kernels_are_forced(monkeypatch) -> None:
    """ROLLSERVE_CPU_ISA=avx2 makes an AMX machine run what an AVX2-only one runs."""
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert make_amx_linear(CPU, torch.bfloat16) is None


@needs_amx
def test_bf16_engine_decodes_through_amx_and_float32_does_not(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2")
    for dtype, expected in (("bfloat16", True), ("float32", False)):
        with Engine(str(path), dtype=dtype, device="cpu", max_total_tokens=1024) as engine:
            assert (engine.model.amx is not None) == expected
            assert all((layer.mlp.down_proj.amx is not None) == expected
                       for layer in engine.model.model.layers)
            out = engine.generate(input_ids=[3, 4, 5], sampling_params={
                "max_new_tokens": 6, "ignore_eos": True})
        assert len(out["output_ids"]) == 6
