"""Fused RMSNorm (with the residual add before it), SwiGLU, and rotary embedding with the K/V write
into the pool on CPU, one pass over memory each, through elementwise.c (bf16 or float32; same
roundings as the eager PyTorch ops they replace; built for AVX-512 or AVX2, see
build.selected_isa)."""

from __future__ import annotations

import logging

import torch

from rollserve.kernels import build
from rollserve.kernels.build import FLOAT, INT, INT64, POINTER

logger = logging.getLogger(__name__)


class FusedElementwise:
    def __init__(self, dtype: torch.dtype, isa: str) -> None:
        library = build.load_kernel("elementwise", build.ELEMENT_MACROS[dtype], isa)
        self._rms_norm = build.bind(
            library, "rms_norm", [POINTER, POINTER, POINTER, POINTER, INT64, INT64, FLOAT, INT]
        )
        self._silu_and_mul = build.bind(
            library, "silu_and_mul", [POINTER, POINTER, INT64, INT64, INT]
        )
        self._rotary_store_kv = build.bind(library, "rotary_store_kv", [
            POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, INT64,
            INT64, INT64, INT64, INT64, INT64, INT64, INT64, INT,
        ])
        self.dtype, self.isa = dtype, isa

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RMSNorm over the last dim into a new tensor. With `residual`, first
        residual += x in place and normalise the sum."""
        size = x.shape[-1]
        self._check(x, weight)
        if residual is not None:
            self._check(residual)
            build.require(residual.shape == x.shape, "residual shape")
        out = torch.empty_like(x)
        self._rms_norm(
            x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
            out.data_ptr(), x.numel() // size, size, eps, torch.get_num_threads(),
        )
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up into a new tensor, where gate_up [..., 2 * size] holds gate in its
        first half and up in its second (the fused gate_up projection's output)."""
        self._check(gate_up)
        build.require(gate_up.shape[-1] % 2 == 0, "gate_up's last dim (gate and up halves)")
        size = gate_up.shape[-1] // 2
        out = gate_up.new_empty((*gate_up.shape[:-1], size))
        self._silu_and_mul(gate_up.data_ptr(), out.data_ptr(), out.numel() // size, size,
                           torch.get_num_threads())
        return out

    def rotary_store_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    ) -> torch.Tensor:
        """q [tokens, heads, head_dim] rotated in place (returned); k rotated and v, both
        [tokens, kv_heads, head_dim], written into one layer of the pool, k_cache and v_cache
        [kv_heads, pool_slots, head_dim], at `slots` [tokens] (the engine's slots: distinct,
        inside the pool). k and v themselves stay unrotated."""
        tokens, heads, head_dim = q.shape
        kv_heads, pool_slots, _ = k_cache.shape
        self._check(cos, sin, k_cache, v_cache)
        for x in (q, k, v):
            build.require(x.dtype == self.dtype and x.device.type == "cpu"
                          and x.stride()[1:] == (head_dim, 1), "tensor dtype, layout or device")
        build.require(k.shape == v.shape == (tokens, kv_heads, head_dim)
                      and k_cache.shape == v_cache.shape == (kv_heads, pool_slots, head_dim),
                      "k, v and the pool's shapes")
        build.require(cos.shape == sin.shape == (tokens, 1, head_dim), "cos and sin shapes")
        build.require(slots.dtype == torch.int64 and slots.shape == (tokens,)
                      and slots.device.type == "cpu", "slots")
        if tokens:  # the kernel writes where the slots say: inside the pool only
            low, high = torch.aminmax(slots)
            build.require(int(low) >= 0 and int(high) < pool_slots, "slots outside the pool")
        slots = slots.contiguous()
        self._rotary_store_kv(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), tokens, heads, kv_heads,
            head_dim, q.stride(0), k.stride(0), v.stride(0), pool_slots,
            torch.get_num_threads(),
        )
        return q

    def _check(self, *tensors: torch.Tensor) -> None:
        # The kernels read raw memory: dtype and layout are checked before every call.
        for t in tensors:
            build.require(t.dtype == self.dtype and t.is_contiguous() and t.device.type == "cpu",
                    "tensor dtype, layout or device")


def make_fused_elementwise(device: torch.device, dtype: torch.dtype) -> FusedElementwise | None:
    """The fused kernels where they apply here, else None (the model keeps eager ops)."""
    isa = build.native_isa(device, dtype)
    if isa is None:
        return None
    try:
        return FusedElementwise(dtype, isa)
    except build.KernelBuildError as exc:
        logger.warning("fused elementwise kernels unavailable, using eager ops: %s", exc)
        return None
