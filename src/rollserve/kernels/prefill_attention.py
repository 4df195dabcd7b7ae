"""Prefill (extend) attention through the kernel in prefill_attention.c: bfloat16 on
AVX-512 CPUs with AVX512_BF16, float32 on AVX-512 and AVX2 + FMA.

`make_prefill_attention` returns None wherever the kernel does not apply (another device
or dtype, a head size that is no multiple of 32, bfloat16 without AVX512_BF16 or with an ISA
forced below AVX-512, no native ISA, no C compiler): the engine then keeps SDPA, which
computes the same attention.
"""

from __future__ import annotations

import logging

import torch

from rollserve.kernels import build
from rollserve.kernels.build import FLOAT, INT, INT64, POINTER

logger = logging.getLogger(__name__)

# The bfloat16 kernel's dot products are vdpbf16ps (build.BF16_DOT_FLAGS); the float32
# kernel's are FMAs.
_ISAS = {torch.bfloat16: ("avx512",), torch.float32: ("avx512", "avx2")}


class PrefillAttention:
    """Callable: (q [q_len, heads, dim], k, v [kv_heads, pool_slots, dim] of one layer,
    kv_slots [kv_len] int64, scale, out) -> out [q_len, heads, dim]. Query i sees keys
    0 .. kv_len - q_len + i: causal after a cached prefix of kv_len - q_len tokens."""

    def __init__(self, head_dim: int, group: int, dtype: torch.dtype = torch.bfloat16,
                 isa: str = "avx512") -> None:
        if isa not in _ISAS.get(dtype, ()):
            raise ValueError(f"no prefill-attention kernel for {dtype} on {isa}: there are "
                             "bfloat16 on avx512, float32 on avx512 and avx2")
        library = build.load_kernel("prefill_attention", {
            "HEAD_DIM": head_dim, "GROUP": group, **build.ELEMENT_MACROS[dtype],
        }, isa, build.BF16_DOT_FLAGS if dtype == torch.bfloat16 else ())
        self._run = build.bind(library, "prefill_attention", [
            POINTER, INT64, POINTER, POINTER, INT64, POINTER, INT64, INT64, POINTER, INT64,
            FLOAT, INT,
        ], returns=INT)
        self.head_dim, self.group = head_dim, group
        self.dtype, self.isa = dtype, isa

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor,
        scale: float, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The kernel reads raw memory: shapes, dtypes and layouts are checked here, once.
        q_len, heads, dim = q.shape
        kv_heads, pool_slots, _ = k.shape
        build.require(dim == self.head_dim and heads == kv_heads * self.group, "q's head layout")
        build.require(q.dtype == k.dtype == v.dtype == self.dtype and k.shape == v.shape, "q, k, v")
        build.require(k.is_contiguous() and v.is_contiguous(), "the KV pool's layout")
        build.require(kv_slots.dtype == torch.int64 and kv_slots.dim() == 1
                      and q_len <= kv_slots.shape[0], "kv_slots")
        if q.stride(2) != 1 or q.stride(1) != dim:  # token rows may lie apart, heads may not
            q = q.contiguous()
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)
        build.require(out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(),
                      "out")
        if q_len == 0:
            return out
        kv_slots = kv_slots.contiguous()
        status = self._run(
            q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), pool_slots,
            kv_slots.data_ptr(), kv_slots.shape[0], q_len, out.data_ptr(), kv_heads, scale,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("prefill attention could not allocate its scratch buffers")
        return out


def make_prefill_attention(
    device: torch.device, dtype: torch.dtype, head_dim: int, group: int
) -> PrefillAttention | None:
    """The kernel where it applies here, else None (the caller keeps SDPA)."""
    isa = build.native_isa(device, dtype)
    if isa not in _ISAS.get(dtype, ()) or head_dim % 32:
        return None
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        return None
    try:
        return PrefillAttention(head_dim, group, dtype, isa)
    except build.KernelBuildError as exc:
        logger.warning("prefill-attention kernel unavailable, using SDPA: %s", exc)
        return None
