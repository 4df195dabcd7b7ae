"""Fused RMSNorm (with the residual add before it), SwiGLU and rotary embedding on CPU, one
pass over memory each, through elementwise.c (bf16 or float32; same roundings as the eager
PyTorch ops they replace; built for AVX-512 or AVX2, see build.selected_isa)."""

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
        self._silu_mul = build.bind(library, "silu_mul", [POINTER, POINTER, INT64, INT64, INT])
        self._rotary = build.bind(
            library, "rotary", [POINTER, POINTER, POINTER, INT64, INT64, INT64, INT64, INT]
        )
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

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate = silu(gate) * up, in place; returns gate."""
        self._check(gate, up)
        build.require(gate.shape == up.shape, "gate and up shapes")
        size = gate.shape[-1]
        self._silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel() // size, size,
                       torch.get_num_threads())
        return gate

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] rotated in place by cos, sin [tokens, 1, head_dim]
        (already in x's dtype); returns x."""
        tokens, heads, head_dim = x.shape
        self._check(x, cos, sin)
        build.require(cos.shape == sin.shape == (tokens, 1, head_dim), "cos and sin shapes")
        self._rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, head_dim,
                     heads * head_dim, torch.get_num_threads())
        return x

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
