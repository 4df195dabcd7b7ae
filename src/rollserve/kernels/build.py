"""Compile a C kernel of this folder into a shared library, once per machine and
specialisation, and load it with ctypes.

The library lands in the rollserve cache under a name that hashes the source, the macros,
the flags and the compiler, so an edit or another model shape builds a new one. It is
compiled into a temporary file and renamed into place: concurrent processes (test workers,
engines of one fleet) never load half a library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from rollserve.cache import cache_dir

KERNEL_DIR = Path(__file__).parent
FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC")


class KernelBuildError(RuntimeError):
    pass


def load_kernel(name: str, macros: dict[str, str | int]) -> ctypes.CDLL:
    """The compiled `name`.c with `macros` defined; raises KernelBuildError with the
    compiler's message when it cannot be built."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler ({compiler!r}) on PATH")
    source = (KERNEL_DIR / f"{name}.c").read_text()
    defines = tuple(f"-D{key}={value}" for key, value in sorted(macros.items()))
    digest = hashlib.sha256("\0".join((source, compiler, *FLAGS, *defines)).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"{name}-{digest[:16]}.so"
    if not target.is_file():
        _compile(compiler, KERNEL_DIR / f"{name}.c", defines, target)
    return ctypes.CDLL(str(target))


def _compile(compiler: str, source: Path, defines: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run(
                [compiler, *FLAGS, *defines, str(source), "-o", staging],
                capture_output=True, text=True, timeout=120,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"{compiler} could not compile {source.name}: {exc}") from exc
        if done.returncode != 0:
            raise KernelBuildError(f"{compiler} failed on {source.name}: {done.stderr.strip()}")
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
