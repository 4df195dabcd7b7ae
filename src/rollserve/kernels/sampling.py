"""Next-token draws through the kernel in sampling.c (built for AVX-512 or AVX2, see
build.selected_isa): argmax for greedy rows, else a draw from softmax(logits / temperature),
for batches where no row filters its candidates (top-k, top-p, min-p). The sampler keeps its
PyTorch path for everything else."""

from __future__ import annotations

import logging

import torch

from rollserve.kernels import build
from rollserve.kernels.build import INT, INT64, POINTER

logger = logging.getLogger(__name__)


class NativeSampling:
    """Callable: (logits [rows, vocab] bf16 or float32, temperatures [rows] float32 (0:
    greedy), draws [rows] float64 in (0, 1]) -> token ids [rows] int64."""

    def __init__(self, isa: str) -> None:
        # Logits arrive in the model dtype, or in float32 once penalties or bans apply.
        self._by_dtype = {
            dtype: build.bind(build.load_kernel("sampling", macros, isa), "sample_rows", [
                POINTER, INT64, INT64, POINTER, POINTER, POINTER, INT,
            ], returns=INT)
            for dtype, macros in build.ELEMENT_MACROS.items()
        }
        self.isa = isa

    def serves(self, logits: torch.Tensor) -> bool:
        return logits.dtype in self._by_dtype and logits.device.type == "cpu"

    def __call__(
        self, logits: torch.Tensor, temperatures: torch.Tensor, draws: torch.Tensor
    ) -> torch.Tensor:
        # The kernel reads raw memory: dtypes, shapes and layouts are checked here, once.
        rows, vocab = logits.shape
        build.require(self.serves(logits), "logits")
        build.require(temperatures.dtype == torch.float32 and temperatures.shape == (rows,)
                      and draws.dtype == torch.float64 and draws.shape == (rows,),
                      "temperatures and draws")
        logits, temperatures, draws = (t.contiguous() for t in (logits, temperatures, draws))
        out = torch.empty(rows, dtype=torch.int64)
        status = self._by_dtype[logits.dtype](
            logits.data_ptr(), rows, vocab, temperatures.data_ptr(), draws.data_ptr(),
            out.data_ptr(), torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("native sampling could not allocate its scratch buffer")
        return out


def make_native_sampling(device: torch.device) -> NativeSampling | None:
    """The kernel where it applies here, else None (the sampler keeps its PyTorch path)."""
    isa = build.native_isa(device, torch.float32)
    if isa is None:
        return None
    try:
        return NativeSampling(isa)
    except build.KernelBuildError as exc:
        logger.warning("native sampling unavailable, using the PyTorch path: %s", exc)
        return None
