"""Decode attention through the kernel in decode_attention.c (CPU, bf16 or float32; built
for AVX-512 or AVX2, see build.selected_isa).

`make_decode_attention` returns None wherever the kernel does not apply (another device or
dtype, a head size that is no multiple of 16, a CPU with neither AVX2 nor AVX-512, no C
compiler): the engine then keeps its PyTorch path, which computes the same attention.
"""

from __future__ import annotations

import logging

import torch

from rollserve.kernels import build
from rollserve.kernels.build import FLOAT, INT, INT64, POINTER

logger = logging.getLogger(__name__)


class DecodeAttention:
    """Callable: (q [n, heads, dim], k, v [kv_heads, pool_slots, dim] of one layer,
    kv_slots [n, max_len] int64, kv_lens [n] int64, scale) -> [n, heads, dim]."""

    def __init__(self, head_dim: int, group: int, dtype: torch.dtype, isa: str) -> None:
        library = build.load_kernel("decode_attention", {
            "HEAD_DIM": head_dim, "GROUP": group, **build.ELEMENT_MACROS[dtype],
        }, isa, build.dot_flags(dtype, isa))
        self._run = build.bind(library, "decode_attention", [
            POINTER, POINTER, POINTER, INT64, POINTER, INT64, POINTER, POINTER, INT64, INT64,
            FLOAT, INT,
        ], returns=INT)
        self.head_dim, self.group, self.dtype, self.isa = head_dim, group, dtype, isa

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor,
        kv_lens: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        # The kernel reads raw memory: shapes, dtypes and layouts are checked here, once.
        n, heads, dim = q.shape
        kv_heads, pool_slots, _ = k.shape
        build.require(dim == self.head_dim and heads == kv_heads * self.group, "q's head layout")
        build.require(q.dtype == k.dtype == v.dtype == self.dtype and k.shape == v.shape, "q, k, v")
        build.require(kv_slots.dtype == kv_lens.dtype == torch.int64 and kv_slots.shape[0] == n
                and kv_lens.shape == (n,), "kv_slots and kv_lens")
        build.require(k.is_contiguous() and v.is_contiguous(), "the KV pool's layout")
        q, kv_slots, kv_lens = q.contiguous(), kv_slots.contiguous(), kv_lens.contiguous()
        out = torch.empty_like(q)
        status = self._run(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), pool_slots, kv_slots.data_ptr(),
            kv_slots.shape[1], kv_lens.data_ptr(), out.data_ptr(), n, kv_heads, scale,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch buffer")
        return out


def make_decode_attention(
    device: torch.device, dtype: torch.dtype, head_dim: int, group: int
) -> DecodeAttention | None:
    """The kernel where it applies here, else None (the caller keeps the PyTorch path)."""
    isa = build.native_isa(device, dtype)
    if isa is None or head_dim % 16:
        return None
    try:
        return DecodeAttention(head_dim, group, dtype, isa)
    except build.KernelBuildError as exc:
        logger.warning("decode-attention kernel unavailable, using the PyTorch path: %s", exc)
        return None
