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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize(("inputs", "outputs"), [(96, 40), (96, 128), (4864, 896)])
def test_float32_linears_give_the_same_bits_packed_or_not_and_agree_with_f_linear(
    inputs: int, outputs: int
) -> None:
    """float32 runs on oneDNN (packed from two rows on, plain for one): an update's window
    before the repack changes no result. Packed only for output features in multiples of 64:
    with oneDNN on AVX2, 40 features summed in another order over the packed weight."""
    layer = Linear(inputs, outputs, bias=True)
    assert can_pack(layer.weight) == (outputs % 64 == 0)
    for rows in (1, 2, 3, 7, 64, 130):
        x = torch.randn(rows, inputs)
        layer.packed = None
        plain = layer(x)
        layer.repack()
        assert (layer.packed is not None) == can_pack(layer.weight)
        assert torch.equal(layer(x), plain)
        torch.testing.assert_close(plain, F.linear(x, layer.weight, layer.bias))
