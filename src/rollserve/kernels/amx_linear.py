"""bfloat16 linears of few rows (decode steps) through the AMX kernel in amx_linear.c.

At up to MAX_ROWS rows a matmul is bound by reading the weight; the kernel reads it at close
to this machine's bandwidth, 1.2-1.6x faster than oneDNN (BENCHMARKS.md). Wider matmuls
(prefill, large decode batches) keep oneDNN, which is as fast or faster there.
"""

from __future__ import annotations

import logging

import torch

from rollserve.kernels import build
from rollserve.kernels.build import INT, INT64, POINTER

logger = logging.getLogger(__name__)

MAX_ROWS = 32  # at 64 rows oneDNN is as fast (compute starts to count)
_AMX_FLAGS = ("-mamx-tile", "-mamx-bf16")


class AmxUnavailable(RuntimeError):
    """This CPU has no AMX-BF16, or the OS does not let the process use tile registers."""


class AmxLinear:
    """Callable: (x [rows, k], weight [n, k], bias [n] or None), all bf16 -> [rows, n]."""

    isa = "avx512"  # every AMX CPU has AVX-512; amx_linear.c is written for its 16 lanes

    def __init__(self) -> None:
        library = build.load_kernel("amx_linear", build.ELEMENT_MACROS[torch.bfloat16],
                                    self.isa, _AMX_FLAGS)
        if build.bind(library, "amx_enable", [], returns=INT)() != 0:
            raise AmxUnavailable("this CPU or OS kernel does not allow AMX tiles")
        self._run = build.bind(library, "amx_linear", [
            POINTER, POINTER, POINTER, POINTER, INT64, INT64, INT64, INT,
        ], returns=INT)

    @staticmethod
    def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this matmul is one the kernel takes: few rows, bf16 on CPU, k a multiple
        of 32 and n of 16 (every linear of the supported models)."""
        return (
            x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype == torch.bfloat16
            and x.device.type == "cpu" and weight.shape[1] % 32 == 0 and weight.shape[0] % 16 == 0
        )

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The kernel reads raw memory: shapes, dtypes and layouts are checked here, once.
        build.require(self.serves(x, weight), "rows, dtype or shape")
        rows, k = x.shape
        n = weight.shape[0]
        build.require(weight.dtype == torch.bfloat16 and weight.shape[1] == k
                      and weight.is_contiguous(), "weight")
        build.require(bias is None or (bias.dtype == torch.bfloat16 and bias.shape == (n,)
                                       and bias.is_contiguous()), "bias")
        x = x.contiguous()
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        status = self._run(x.data_ptr(), weight.data_ptr(),
                           0 if bias is None else bias.data_ptr(), out.data_ptr(), rows, n, k,
                           torch.get_num_threads())
        if status != 0:
            raise MemoryError("AMX linear could not allocate its scratch buffer")
        return out


def make_amx_linear(device: torch.device, dtype: torch.dtype) -> AmxLinear | None:
    """The kernel where it applies here (bf16 on a CPU with AMX, AVX-512 selected), else None
    (oneDNN). With ROLLSERVE_CPU_ISA=avx2 an AMX CPU runs what an AVX2-only one would."""
    if dtype != torch.bfloat16 or build.native_isa(device, dtype) != AmxLinear.isa:
        return None
    try:
        return AmxLinear()
    except AmxUnavailable as exc:
        logger.info("AMX linear kernel not used: %s", exc)
        return None
    except build.KernelBuildError as exc:
        logger.warning("AMX linear kernel unavailable, using oneDNN: %s", exc)
        return None
