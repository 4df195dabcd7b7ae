"""Linear layers that use oneDNN prepacked weights on CPU (bfloat16, float16, float32), and
the AMX kernel for bf16 matmuls of few rows.

oneDNN multiplies ~1.5x faster at decode batch sizes when the weight is laid out for it in
advance, with bit-identical results. The packed copy is derived state: whoever changes a
weight calls `repack()` (CausalLM.repack_weights() for the whole model). The AMX kernel reads
the plain weight, so packed or not makes no difference to the matmuls it takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollserve.kernels.amx_linear import AmxLinear
from rollserve.models.parallel import Shard

_PACK_BATCH_HINT = 64  # the layout suits any batch; 64 is a typical decode batch
# oneDNN's float32 product sums in the same order over a packed weight as over the plain one
# (from two rows on) only for output features in multiples of 64 on every ISA: on AVX2 alone
# 40, 100 or 1000 features gave other bits (BENCHMARKS.md, "float32 packing on AVX2").
_FLOAT32_PACK_FEATURES = 64


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packs float32 everywhere (here: where the packed product keeps the plain one's
    bits, so a result never depends on whether an updated weight was repacked yet) and bf16
    on any AVX-512 CPU, but fp16 only where the CPU converts fp16 itself (avx512_fp16 or
    avx_ne_convert): elsewhere its reorder raises."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return weight.shape[0] % _FLOAT32_PACK_FEATURES == 0
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    if not can_pack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)


def _onednn_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a float32 matmul goes to oneDNN on its plain weight (unpacked, or one row).
    F.linear takes float32 to the BLAS PyTorch was built with, which on an AMD EPYC ran 2-4x
    slower than oneDNN at every row count (BENCHMARKS.md, "float32 linears")."""
    return (x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available())


def _packed_serves(x: torch.Tensor) -> bool:
    """A packed float32 weight takes two rows or more. For one row oneDNN sums in another
    order over a packed weight than over the plain one (from two rows on the bits agree), and
    reads the plain one as fast: so a float32 result never depends on whether the weight
    was repacked yet after an update."""
    return x.dtype != torch.float32 or x.numel() > x.shape[-1]


def linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
    bias: torch.Tensor | None = None, amx: AmxLinear | None = None,
) -> torch.Tensor:
    if amx is not None and amx.serves(x, weight):
        return amx(x, weight, bias)
    if packed is not None and _packed_serves(x):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if _onednn_float32(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`shard`: the part of the checkpoint's weight this one holds under tensor parallelism
    (dim 0: some output features; dim 1: some input features, partial sums); None: all."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 shard: Shard | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.shard = shard
        self.packed: torch.Tensor | None = None
        self.amx: AmxLinear | None = None  # takes the few-row matmuls when set

    def repack(self) -> None:
        self.packed = pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias, self.amx)


class FusedLinear(Linear):
    """Several projections of the same input as one matmul, their output rows stacked in the
    order given. `parts`: checkpoint name -> the rows of that tensor held here (all of them
    without tensor parallelism). Split the output with `sizes`."""

    def __init__(self, in_features: int, parts: dict[str, Shard], bias: bool) -> None:
        super().__init__(in_features, sum(s.length for s in parts.values()), bias=bias)
        self.parts = dict(parts)
        self.sizes = [s.length for s in parts.values()]

    def part_rows(self) -> dict[str, slice]:
        """Each part's rows of the fused weight (and bias)."""
        rows, start = {}, 0
        for name, shard in self.parts.items():
            rows[name] = slice(start, start + shard.length)
            start += shard.length
        return rows
