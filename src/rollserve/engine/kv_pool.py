"""The KV pool: one preallocated K and V tensor for every token slot, and its allocator.

Slot 0 is reserved as padding (padded gathers read it; nothing is ever stored there), so a
pool of `size` usable tokens holds `size + 1` slots. The pool never grows.
"""

from __future__ import annotations

import logging

import psutil
import torch

from rollserve.models.config import ModelConfig

logger = logging.getLogger(__name__)

PADDING_SLOT = 0


class KVPool:
    def __init__(
        self, config: ModelConfig, size: int, dtype: torch.dtype, device: torch.device,
        kv_heads: int | None = None,
    ) -> None:
        """`kv_heads`: the KV heads this pool holds (a tensor-parallel rank's share); default
        all of the model's."""
        if size < 1:
            raise ValueError(f"KV pool must hold at least one token, got {size}")
        # Head-major ([layers, kv_heads, slots, dim]) so a gather of slots yields one
        # contiguous [tokens, dim] matrix per head, ready for batched matmuls.
        kv_heads = config.num_kv_heads if kv_heads is None else kv_heads
        shape = (config.num_layers, kv_heads, size + 1, config.head_dim)
        # `empty`, not `zeros`: on CPU untouched pages cost no RAM until slots are used.
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        # Padding reads are masked out, but 0 * NaN is NaN: the padding slot must hold zeros.
        self.k_cache[:, :, PADDING_SLOT].zero_()
        self.v_cache[:, :, PADDING_SLOT].zero_()
        self.size = size
        self.device = device
        # Free slots as a stack in a tensor (allocation and release are slices, no Python
        # loops); the top holds the lowest slots so a fresh pool hands out contiguous runs.
        self._free = torch.arange(size, 0, -1, dtype=torch.int64, device=device)
        self._num_free = size

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.size - self._num_free

    def alloc(self, count: int) -> torch.Tensor | None:
        """`count` free slots, or None when the pool lacks them (the caller evicts or waits)."""
        if count > self._num_free:
            return None
        slots = self._free[self._num_free - count : self._num_free].clone()
        self._num_free -= count
        return slots

    def free(self, slots: torch.Tensor) -> None:
        count = slots.numel()
        if count == 0:
            return
        self._free[self._num_free : self._num_free + count] = slots
        self._num_free += count


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


def pool_size_from_memory(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, mem_fraction_static: float
) -> int:
    """Tokens that fit in `mem_fraction_static` of the device's free memory after the weights
    (GPU memory on CUDA, available RAM on CPU), as SGLang sizes its pool."""
    if not 0.0 < mem_fraction_static < 1.0:
        raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - mem_fraction_static) * total
    else:
        # Called after the weights are loaded, so available RAM already excludes them.
        budget = psutil.virtual_memory().available * mem_fraction_static
    tokens = int(budget // bytes_per_token(config, dtype))
    if tokens < 1:
        raise ValueError(
            f"no memory left for the KV pool with mem_fraction_static={mem_fraction_static}; "
            "raise it or set max_total_tokens"
        )
    return tokens


class ReqToTokenTable:
    """Row r lists, in position order, the pool slots of the running request owning row r
    (SGLang's req_to_token): a batch's KV slots are one 2-D gather from it."""

    def __init__(self, rows: int, max_len: int, device: torch.device) -> None:
        self.slots = torch.zeros((rows, max_len), dtype=torch.int64, device=device)
        self.max_len = max_len
        self._free_rows = list(range(rows - 1, -1, -1))

    def alloc_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)
