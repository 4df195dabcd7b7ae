"""Compile a C kernel of this folder into a shared library, once per machine and
specialisation, and load it with ctypes.

The library lands in the rollserve cache under a name that hashes the source (and the
shared headers), the macros, the flags and the compiler, so an edit or another model shape
builds a new one. It is compiled into a temporary file and renamed into place: concurrent
processes (test workers, engines of one fleet) never load half a library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from rollserve.cache import cache_dir

KERNEL_DIR = Path(__file__).parent
# -ffp-contract=off: no fused multiply-adds where the C says multiply, round, add (the
# kernels reproduce the roundings of eager PyTorch ops).
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-ffp-contract=off", "-fopenmp",
         "-shared", "-fPIC", f"-I{KERNEL_DIR}")


# How each supported storage dtype is spelled for the kernels' ELEM macros.
ELEMENT_MACROS: dict[torch.dtype, dict[str, str | int]] = {
    torch.bfloat16: {"ELEM": "uint16_t", "ELEM_IS_BF16": 1},
    torch.float32: {"ELEM": "float", "ELEM_IS_BF16": 0},
}


# ctypes spellings of the kernels' C parameter types.
POINTER, INT64, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class KernelBuildError(RuntimeError):
    pass


def bind(
    library: ctypes.CDLL, name: str, argtypes: list[type], returns: type | None = None
) -> ctypes._CFuncPtr:
    """The C function `name` of `library`, typed (ctypes releases the GIL around calls)."""
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, returns
    return function


def require(condition: bool, what: str) -> None:
    """Guard before handing raw pointers to a kernel (a plain assert vanishes under -O)."""
    if not condition:
        raise ValueError(f"native kernel called with unsupported {what}")


def kernels_apply(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the native kernels can serve tensors of this device and dtype here."""
    return why_not_native(device, dtype) is None


def why_not_native(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no native kernel serves this device and dtype here, or None when they can."""
    if device.type != "cpu":
        return f"they are CPU kernels and the engine runs on {device.type}"
    if dtype not in ELEMENT_MACROS:
        return f"they take bfloat16 or float32, not {str(dtype).removeprefix('torch.')}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"they need AVX-512 and this CPU offers {capability}"
    return None


def load_kernel(
    name: str, macros: dict[str, str | int], extra_flags: tuple[str, ...] = ()
) -> ctypes.CDLL:
    """The compiled `name`.c with `macros` defined (and `extra_flags`, such as instruction
    sets only some kernels use); raises KernelBuildError with the compiler's message when it
    cannot be built."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler ({compiler!r}) on PATH")
    sources = [(KERNEL_DIR / f"{name}.c").read_text()]
    sources += [header.read_text() for header in sorted(KERNEL_DIR.glob("*.h"))]
    defines = tuple(f"-D{key}={value}" for key, value in sorted(macros.items()))
    options = (*extra_flags, *defines)
    digest = hashlib.sha256(
        "\0".join((*sources, compiler, *FLAGS, *options)).encode()
    ).hexdigest()
    target = cache_dir() / "kernels" / f"{name}-{digest[:16]}.so"
    if not target.is_file():
        _compile(compiler, KERNEL_DIR / f"{name}.c", options, target)
    return ctypes.CDLL(str(target))


def _compile(compiler: str, source: Path, options: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run(
                [compiler, *FLAGS, *options, str(source), "-o", staging],
                capture_output=True, text=True, timeout=120,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"{compiler} could not compile {source.name}: {exc}") from exc
        if done.returncode != 0:
            raise KernelBuildError(f"{compiler} failed on {source.name}: {done.stderr.strip()}")
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
