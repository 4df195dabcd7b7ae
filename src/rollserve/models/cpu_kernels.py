"""C++ kernels for the CPU path, compiled on first use with torch's extension builder (needs a
C++ compiler and ninja; the build is cached on disk, so later processes load it in about a
second). Where the build is impossible, callers fall back to the pure-PyTorch path.

Set ROLLSERVE_CPU_KERNELS=0 to use the PyTorch path always.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]


@functools.cache
def decode_attention_kernel() -> DecodeAttention | None:
    """The compiled paged decode-attention kernel, or None when it cannot be built."""
    if os.environ.get("ROLLSERVE_CPU_KERNELS", "1") == "0":
        return None
    from torch.utils import cpp_extension

    try:
        module = cpp_extension.load(
            name="rollserve_cpu_kernels", sources=[str(SOURCES / "decode_attention.cpp")],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-lmvec"], verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, ...: the PyTorch path still works
        logger.warning("CPU attention kernel unavailable (%s); using the PyTorch path", exc)
        return None
    return module.decode_attention
