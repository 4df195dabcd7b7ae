"""Tensor parallelism inside one model: which share of every weight a rank holds, and the
collectives that join the shares. Megatron's layout, as SGLang shards it:

- column parallel (each rank computes some output features): the fused q/k/v projection by
  attention heads, gate/up by intermediate features, the embedding and lm_head by vocab rows;
- row parallel (each rank reads some input features, partial sums all-reduced): o_proj and
  down_proj;
- everything else (norms) replicated.

KV heads are split like query heads when there are at least as many as ranks; with fewer,
each is replicated on `size / num_kv_heads` consecutive ranks (rank r holds KV head
r * num_kv_heads // size), so every rank's query heads find their KV head locally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rollserve.kernels.shm_collectives import SharedMemoryGroup
from rollserve.models.config import ModelConfig


@dataclass(slots=True, frozen=True)
class TensorParallel:
    """This rank's place in its engine's tensor-parallel group. `group` is None exactly when
    `size` is 1: then no collective runs and every weight is whole. With `shm` (ranks of one
    machine, native kernels built), collectives of its dtype go through shared memory, the
    rest through `group`; every rank makes the same choice for the same collective, as all
    run the same forward."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    shm: SharedMemoryGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        if self.size == 1:
            return x
        if self.shm is not None and x.dtype == self.shm.dtype and x.is_contiguous():
            return self.shm.all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] on every rank -> [rows, size * cols], rank order."""
        if self.size == 1:
            return x
        if self.shm is not None and self.shm.fits_row(x):
            return self.shm.all_gather_columns(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


@dataclass(slots=True, frozen=True)
class Shard:
    """The part of a checkpoint tensor a rank holds: `length` of the `total` entries of
    dimension `dim`, from `start`."""

    dim: int
    start: int
    length: int
    total: int

    @property
    def whole(self) -> bool:
        return self.length == self.total

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.length)


@dataclass(slots=True, frozen=True)
class HeadShard:
    """The attention heads of one rank."""

    num_heads: int
    num_kv_heads: int
    first_head: int
    first_kv_head: int


def head_shard(config: ModelConfig, tp: TensorParallel) -> HeadShard:
    check_divisible(config, tp.size)
    heads = config.num_heads // tp.size
    if config.num_kv_heads >= tp.size:
        kv_heads = config.num_kv_heads // tp.size
        first_kv = tp.rank * kv_heads
    else:  # replicated: consecutive ranks share one KV head
        kv_heads, first_kv = 1, tp.rank * config.num_kv_heads // tp.size
    return HeadShard(heads, kv_heads, tp.rank * heads, first_kv)


def check_divisible(config: ModelConfig, size: int) -> None:
    """Raise ValueError naming the dimension `size` ranks cannot split evenly."""
    if size < 1:
        raise ValueError(f"tp_size must be at least 1, got {size}")
    problems = []
    if config.num_heads % size:
        problems.append(f"{config.num_heads} attention heads")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"{kv} KV heads (split evenly, or each replicated on the same number "
                        "of ranks)")
    if config.intermediate_size % size:
        problems.append(f"an intermediate size of {config.intermediate_size}")
    if problems:
        raise ValueError(f"tp_size={size} does not divide this model's "
                         f"{' or '.join(problems)}")


def split_evenly(total: int, tp: TensorParallel, dim: int = 0) -> Shard:
    """This rank's equal share of dimension `dim`; `size` must divide `total`."""
    length = total // tp.size
    return Shard(dim, tp.rank * length, length, total)


def head_rows(first_head: int, heads: int, total_heads: int, head_dim: int) -> Shard:
    return Shard(0, first_head * head_dim, heads * head_dim, total_heads * head_dim)


def vocab_shard(vocab_size: int, tp: TensorParallel) -> tuple[Shard, int]:
    """This rank's vocab rows and the padded rows per rank (every rank holds the same count;
    the last one's tail beyond the vocab is padding, zero in the embedding, never a logit)."""
    per_rank = -(-vocab_size // tp.size)
    start = tp.rank * per_rank
    length = max(0, min(per_rank, vocab_size - start))
    return Shard(0, start, length, vocab_size), per_rank
