"""All-reduce and all-gather between the tensor-parallel ranks of one machine through shared
memory (shm_collectives.c): a few microseconds each where gloo's TCP loopback takes
hundreds.

Rank 0 creates the region (`create_region`), every rank maps it (`SharedMemoryGroup`), and
rank 0 unlinks the file once all have: the mapping lives on in each rank and nothing is left
in /dev/shm whatever happens next. A rank 0 killed during the start, before the unlink,
leaves its file; the file's name holds its pid, and the next `create_region` removes the
files of pids that no longer run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from pathlib import Path

import torch

from rollserve.kernels import build
from rollserve.kernels.build import INT, INT64, POINTER

LINE = 64  # the C file's header line
SLOT_BYTES = 4 << 20  # one chunk of a collective; larger ones run in chunks
PREFIX = "rollserve-tp-"  # then the creator's pid, "-", a unique part


class GroupBroken(RuntimeError):
    """A collective gave up: a rank exited (or the group was aborted)."""


def region_bytes(size: int) -> int:
    return (size + 1) * LINE + 2 * size * SLOT_BYTES


def create_region(size: int) -> str:
    """A zeroed file for `size` ranks' region, in /dev/shm where there is one; its path."""
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() else Path(tempfile.gettempdir())
    _remove_orphans(folder)
    fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=folder)
    try:
        os.ftruncate(fd, region_bytes(size))
    finally:
        os.close(fd)
    return path


def _remove_orphans(folder: Path) -> None:
    """Remove the regions whose creator (the pid in the name) no longer runs."""
    for path in folder.glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SharedMemoryGroup:
    """This rank's end of the region at `path`: collectives of ELEM `dtype` among `size`
    ranks. `parent` is rank 0's pid (a rank whose parent changes gives up waiting)."""

    def __init__(self, path: str, rank: int, size: int, dtype: torch.dtype, isa: str,
                 parent: int) -> None:
        library = build.load_kernel("shm_collectives", build.ELEMENT_MACROS[dtype], isa)
        common = [POINTER, INT, INT, INT64, INT64, POINTER]
        self._all_reduce = build.bind(library, "all_reduce", [*common, POINTER, INT64], INT)
        self._all_gather = build.bind(library, "all_gather_rows",
                                      [*common, POINTER, POINTER, INT64, INT64], INT)
        self._abort = build.bind(library, "abort_group", [POINTER, INT])
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), region_bytes(size))
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._seq = ctypes.c_uint64(0)
        self.rank, self.size, self.dtype, self.parent = rank, size, dtype, parent

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (every rank gets the same bits)."""
        self._check(x)
        self._done(self._all_reduce(self._base, self.rank, self.size, SLOT_BYTES, self.parent,
                                    ctypes.byref(self._seq), x.data_ptr(), x.numel()))
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] on every rank -> [rows, size * cols], rank order."""
        x = x.contiguous()
        build.require(x.device.type == "cpu" and x.dim() == 2 and self.fits_row(x),
                      "tensor device, shape or row size")
        rows, cols = x.shape
        row_bytes = cols * x.element_size()
        out = x.new_empty((rows, self.size * cols))
        self._done(self._all_gather(self._base, self.rank, self.size, SLOT_BYTES, self.parent,
                                    ctypes.byref(self._seq), x.data_ptr(), out.data_ptr(),
                                    rows, row_bytes))
        return out

    @staticmethod
    def fits_row(x: torch.Tensor) -> bool:
        """Whether a row of `x` fits a slot (any dtype: a gather copies bytes)."""
        return x.shape[-1] * x.element_size() <= SLOT_BYTES

    def abort(self) -> None:
        """Make every rank waiting in (or entering) a collective give up."""
        self._abort(self._base, self.size)

    def _check(self, x: torch.Tensor) -> None:
        build.require(x.dtype == self.dtype and x.is_contiguous() and x.device.type == "cpu",
                      "tensor dtype, layout or device")

    @staticmethod
    def _done(code: int) -> None:
        if code != 0:
            raise GroupBroken("a tensor-parallel collective gave up: a rank has exited")
