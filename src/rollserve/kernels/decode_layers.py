"""Every decoder layer of a decode step of few rows in one native call (decode_layers.c: CPU,
bf16 or float32, built for AVX-512 or AVX2; vdpbf16ps dot products where the CPU has
AVX512_BF16).

`make_decode_layers` returns None wherever the kernel does not apply (another device or dtype,
a shape it does not take, no compiler): the model then runs its layers one operator at a time,
which computes the same step.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

from rollserve.kernels import build
from rollserve.kernels.build import FLOAT, INT, INT64, POINTER

logger = logging.getLogger(__name__)

# decode_layers.c's MAX_ROWS. At 1-3 rows the kernel's step beats layer-by-layer (1.47x at one
# row, 1.31 at two, 1.17 at three in bf16 at ~80 GB/s); from four rows oneDNN's
# matmuls win, even with a 4-row tile (BENCHMARKS.md, "Batch-1 decode in one native call" and
# "Batch-1 decode: weight rows in address order").
MAX_ROWS = 3
_DOT_STEP = 32  # the dot products' step: hidden, intermediate and query sizes divide by it


@dataclass(frozen=True, slots=True)
class LayerShape:
    """What the kernel is compiled for: one model's layer, without tensor parallelism."""

    hidden: int
    intermediate: int
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    qk_norm: bool

    @property
    def q_size(self) -> int:
        return self.kv_heads * self.group * self.head_dim

    def supported(self) -> bool:
        return self.head_dim % 16 == 0 and all(
            size % _DOT_STEP == 0 for size in (self.hidden, self.intermediate, self.q_size))


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One layer's parameters as the kernel reads them (struct LayerWeights, same order):
    qkv [q + 2 kv, hidden] with its bias or None; gate_up [2 intermediate, hidden], gate rows
    first; q_norm and k_norm None unless the shape has qk_norm."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class WeightTable:
    """The layers' weight addresses, checked once: valid while those tensors live and are
    not replaced (whoever swaps a parameter builds a new table)."""

    def __init__(self, shape: LayerShape, dtype: torch.dtype, layers: list[LayerWeights]) -> None:
        kv = shape.kv_heads * shape.head_dim
        qkv_rows = shape.q_size + 2 * kv
        norm = (shape.head_dim,) if shape.qk_norm else None
        expected = {
            "input_norm": (shape.hidden,), "qkv": (qkv_rows, shape.hidden),
            "qkv_bias": (qkv_rows,), "q_norm": norm, "k_norm": norm,
            "o": (shape.hidden, shape.q_size), "post_norm": (shape.hidden,),
            "gate_up": (2 * shape.intermediate, shape.hidden),
            "down": (shape.hidden, shape.intermediate),
        }
        addresses: list[int | None] = []
        for layer in layers:
            for name, size in expected.items():
                tensor = getattr(layer, name)
                optional = name == "qkv_bias" or size is None
                build.require(tensor is not None or optional, f"layer weight {name}")
                if tensor is not None:
                    build.require(tuple(tensor.shape) == size and tensor.dtype == dtype
                                  and tensor.is_contiguous() and tensor.device.type == "cpu",
                                  f"layer weight {name}")
                addresses.append(None if tensor is None else tensor.data_ptr())
        self.num_layers = len(layers)
        self.pointers = (ctypes.c_void_p * len(addresses))(*addresses)


class DecodeLayers:
    """Callable: (table, x [n, hidden] embeddings, cos, sin [n, 1, head_dim], k/v cache
    [layers, kv_heads, slots, head_dim], out_slots [n], kv_slots [n, max_len], kv_lens [n],
    scale, eps) -> (output, residual) of the last layer, the final norm's inputs. x is
    overwritten; the pool receives this step's K/V. `logits` is the lm_head of such a step."""

    max_rows = MAX_ROWS

    def __init__(self, shape: LayerShape, dtype: torch.dtype, isa: str) -> None:
        macros = {"HIDDEN": shape.hidden, "INTERMEDIATE": shape.intermediate,
                  "KV_HEADS": shape.kv_heads, "GROUP": shape.group, "HEAD_DIM": shape.head_dim,
                  "QK_NORM": int(shape.qk_norm), **build.ELEMENT_MACROS[dtype]}
        library = build.load_kernel("decode_layers", macros, isa, build.dot_flags(dtype, isa))
        self._run = build.bind(library, "decode_layers", [
            POINTER, INT64, INT64, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, INT64,
            POINTER, POINTER, INT64, POINTER, FLOAT, FLOAT, POINTER, INT,
        ], returns=INT)
        self._logits = build.bind(library, "decode_logits", [
            POINTER, INT64, POINTER, INT64, POINTER, INT,
        ], returns=INT)
        scratch = build.bind(library, "decode_layers_scratch", [INT64], returns=INT64)
        self._scratch_per_row = scratch(1)
        self.shape, self.dtype, self.isa = shape, dtype, isa

    def weight_table(self, layers: list[LayerWeights]) -> WeightTable:
        return WeightTable(self.shape, self.dtype, layers)

    def __call__(
        self, table: WeightTable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, out_slots: torch.Tensor,
        kv_slots: torch.Tensor, kv_lens: torch.Tensor, scale: float, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel reads raw memory: shapes, dtypes and layouts are checked here, once.
        n = x.shape[0]
        shape = self.shape
        build.require(0 < n <= MAX_ROWS and x.shape == (n, shape.hidden) and x.is_contiguous()
                      and x.dtype == self.dtype, "rows or hidden states")
        build.require(cos.shape == sin.shape == (n, 1, shape.head_dim) and cos.is_contiguous()
                      and sin.is_contiguous() and cos.dtype == sin.dtype == self.dtype, "cos/sin")
        pool = (table.num_layers, shape.kv_heads, k_cache.shape[2], shape.head_dim)
        build.require(k_cache.shape == v_cache.shape == pool and k_cache.is_contiguous()
                      and v_cache.is_contiguous() and k_cache.dtype == self.dtype, "the KV pool")
        build.require(out_slots.shape == (n,) and kv_lens.shape == (n,)
                      and kv_slots.shape[0] == n and kv_slots.is_contiguous()
                      and out_slots.dtype == kv_slots.dtype == kv_lens.dtype == torch.int64,
                      "slots")
        out_slots, kv_lens = out_slots.contiguous(), kv_lens.contiguous()
        residual = x.clone()
        scratch = torch.empty(n * self._scratch_per_row, dtype=self.dtype)
        status = self._run(
            table.pointers, table.num_layers, n, x.data_ptr(), residual.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.shape[2], out_slots.data_ptr(), kv_slots.data_ptr(), kv_slots.shape[1],
            kv_lens.data_ptr(), scale, eps, scratch.data_ptr(), torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("decode layers could not allocate their scratch buffer")
        return x, residual

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [n, hidden] (n <= MAX_ROWS) times weight [vocab, hidden] transposed: [n, vocab]
        in the model dtype, rounded once, as oneDNN's lm_head rounds."""
        n, hidden = x.shape[0], self.shape.hidden
        build.require(0 < n <= MAX_ROWS and x.shape == (n, hidden) and x.is_contiguous()
                      and x.dtype == self.dtype, "rows or hidden states")
        build.require(weight.dim() == 2 and weight.shape[1] == hidden and weight.is_contiguous()
                      and weight.dtype == self.dtype and weight.device.type == "cpu",
                      "lm_head weight")
        out = torch.empty(n, weight.shape[0], dtype=self.dtype)
        self._logits(x.data_ptr(), n, weight.data_ptr(), weight.shape[0], out.data_ptr(),
                     torch.get_num_threads())
        return out


def make_decode_layers(
    device: torch.device, dtype: torch.dtype, shape: LayerShape
) -> DecodeLayers | None:
    """The kernel where it applies here, else None (the model runs its layers op by op)."""
    isa = build.native_isa(device, dtype)
    if isa is None or not shape.supported():
        return None
    try:
        return DecodeLayers(shape, dtype, isa)
    except build.KernelBuildError as exc:
        logger.warning("decode-layers kernel unavailable, running layers op by op: %s", exc)
        return None
