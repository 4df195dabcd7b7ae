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
