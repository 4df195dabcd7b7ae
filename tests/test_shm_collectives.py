"""The tensor-parallel ranks' shared-memory collectives, between real processes: every rank
gets the rank-order float32 sum (rounded once) and the rank-order gather, collectives larger
than a slot run in chunks, and a rank waiting for a peer that is gone gives up instead of
spinning forever."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from native_isas import ISAS

from rollserve.kernels.shm_collectives import (
    PREFIX,
    SLOT_BYTES,
    GroupBroken,
    SharedMemoryGroup,
    create_region,
)

SPAWN = multiprocessing.get_context("spawn")
# bf16 elements in one chunk, plus some: the sum crosses a chunk boundary mid-vector.
LONG = SLOT_BYTES // 2 + 37


def _rank_data(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank)).to(dtype)


def _collectives(path: str, rank: int, size: int, dtype: torch.dtype, isa: str,
                 numel: int, rows: int, results) -> None:
    group = SharedMemoryGroup(path, rank, size, dtype, isa, os.getppid())
    reduced = group.all_reduce(_rank_data(rank, numel, dtype))
    gathered = group.all_gather_columns(_rank_data(rank, rows * 3, dtype).view(rows, 3))
    results.put((rank, _to_bytes(reduced), _to_bytes(gathered)))


def _to_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor as plain bytes (a queue would pass its storage by a file descriptor, which
    dies with the sending process)."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("size", "numel"), [(2, 1000), (3, 17), (2, LONG)])
def test_every_rank_gets_the_rank_order_sum_and_gather(isa, dtype, size, numel,
                                                       tmp_path) -> None:
    path = create_region(size)
    results = SPAWN.Queue()
    rows = 5
    ranks = [SPAWN.Process(target=_collectives,
                           args=(path, r, size, dtype, isa, numel, rows, results))
             for r in range(1, size)]
    for process in ranks:
        process.start()
    try:
        _collectives(path, 0, size, dtype, isa, numel, rows, results)
        got = {rank: (torch.load(io.BytesIO(red)), torch.load(io.BytesIO(gat)))
               for rank, red, gat in (results.get(timeout=120) for _ in range(size))}
    finally:
        Path(path).unlink()
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    total = sum(_rank_data(r, numel, dtype).float() for r in range(size)).to(dtype)
    parts = [_rank_data(r, rows * 3, dtype).view(rows, 3) for r in range(size)]
    for rank in range(size):
        reduced, gathered = got[rank]
        assert torch.equal(reduced, total), rank
        assert torch.equal(gathered, torch.cat(parts, dim=1)), rank


def _wait_alone(path: str, isa: str, parent: int, marker: str) -> None:
    """Rank 1 of 2 enters a collective rank 0 never joins; writes what happened."""
    group = SharedMemoryGroup(path, 1, 2, torch.float32, isa, parent)
    Path(marker + ".pid").write_text(str(os.getpid()))
    try:
        group.all_reduce(torch.ones(8))
        Path(marker).write_text("returned")
    except GroupBroken:
        Path(marker).write_text("gave up")


@pytest.mark.parametrize("isa", ISAS)
def test_a_rank_waiting_in_a_collective_gives_up_when_the_group_is_aborted(isa,
                                                                          tmp_path) -> None:
    path = create_region(2)
    marker = tmp_path / "rank1"
    rank1 = SPAWN.Process(target=_wait_alone, args=(path, isa, os.getpid(), str(marker)))
    rank1.start()
    try:
        rank0 = SharedMemoryGroup(path, 0, 2, torch.float32, isa, os.getpid())
        rank1.join(timeout=1)
        assert rank1.is_alive()  # waiting for rank 0
        rank0.abort()
        rank1.join(timeout=30)
        assert marker.read_text() == "gave up"
    finally:
        Path(path).unlink()
        if rank1.is_alive():
            rank1.kill()


def _start_orphan(path: str, isa: str, marker: str) -> None:
    """Play rank 0: start rank 1 (our child), then exit while it waits for us."""
    rank1 = SPAWN.Process(target=_wait_alone, args=(path, isa, os.getpid(), marker))
    rank1.start()
    started = Path(marker + ".pid")
    while not started.exists() and rank1.is_alive():
        rank1.join(timeout=0.1)
    rank1.join(timeout=0.5)  # now waiting in the collective
    os._exit(0)  # without joining: rank 1 outlives us and is reparented


@pytest.mark.parametrize("isa", ISAS)
def test_a_rank_waiting_in_a_collective_gives_up_when_rank_0_dies(isa, tmp_path) -> None:
    path = create_region(2)
    marker = tmp_path / "rank1"
    rank0 = SPAWN.Process(target=_start_orphan, args=(path, isa, str(marker)))
    rank0.start()
    try:
        rank0.join(timeout=120)
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.read_text() == "gave up"
    finally:
        Path(path).unlink()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)


def test_a_region_left_by_a_dead_rank_0_is_removed_by_the_next_start() -> None:
    dead = SPAWN.Process(target=os.getpid)
    dead.start()
    dead.join()
    orphan = Path(create_region(2))
    left = orphan.with_name(f"{PREFIX}{dead.pid}-{orphan.name.rsplit('-', 1)[1]}")
    orphan.rename(left)  # as if the dead process had created it
    mine = Path(create_region(2))
    try:
        assert not left.exists()
        mine_again = Path(create_region(2))
        assert mine.exists()  # a running creator's region stays
        mine_again.unlink()
    finally:
        mine.unlink()
        left.unlink(missing_ok=True)
