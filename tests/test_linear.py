"""oneDNN-prepacked linears give bit-identical results to F.linear and follow weight changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollserve.models.linear import Linear, can_pack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_linear_is_bit_identical_and_repacks(dtype: torch.dtype) -> None:
    layer = Linear(96, 40, bias=True).to(dtype)
    if not can_pack(layer.weight):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
    layer.repack()
    assert layer.packed is not None
    for rows in (1, 7, 64, 130):
        x = torch.randn(rows, 96, dtype=dtype)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.repack()
    x = torch.randn(5, 96, dtype=dtype)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_float32_is_not_packed() -> None:
    layer = Linear(8, 4, bias=False)
    layer.repack()
    assert layer.packed is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_float32_linears_run_on_onednn_over_the_plain_weight_and_agree_with_f_linear() -> None:
    """No packed copy, so the same weights give the same bits before and after a repack."""
    layer = Linear(96, 40, bias=True)
    for rows in (1, 3, 64):
        x = torch.randn(rows, 96)
        onednn = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
        got = layer(x)
        assert torch.equal(got, onednn)
        layer.repack()
        assert torch.equal(layer(x), got)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))
