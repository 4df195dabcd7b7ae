"""Compile a C kernel of this folder into a shared library, once per machine, instruction set
and specialisation, and load it with ctypes.

Each kernel is one C source written against simd.h, which implements its vector layer for
AVX-512 and for AVX2 + FMA; the instruction set (ISA) a kernel is compiled for picks the
implementation. The ISA is chosen at run time: the best this CPU runs, or ROLLSERVE_CPU_ISA
(avx512, avx2 or none) for tests and benchmarks.

The library lands in the rollserve cache under a name that hashes the source (and the
shared headers), the macros, the flags (the ISA's among them) and the compiler, so an edit,
another ISA or another model shape builds a new one. It is compiled into a temporary file
and renamed into place: concurrent processes (test workers, engines of one fleet) never load
half a library.
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

from rollserve.utils.cache import cache_dir

KERNEL_DIR = Path(__file__).parent
# -ffp-contract=off: no fused multiply-adds where the C says multiply, round, add (the
# kernels reproduce the roundings of eager PyTorch ops).
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", f"-I{KERNEL_DIR}")

# The instruction sets the kernels are built for, best first, with the flags that select
# simd.h's implementation (and let the compiler use nothing beyond the ISA).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
}
# vdpbf16ps (AVX512_BF16), beyond what ISA_FLAGS["avx512"] lets the compiler use: the bfloat16
# dot products of the attention and decode-layers kernels.
BF16_DOT_FLAGS = ("-mavx512bf16",)
# torch's CPU capability -> the ISAs this CPU runs, best first. torch reports "AVX512" only
# with AVX-512 F/BW/VL/DQ and FMA, "AVX2" only with FMA (and caps both at
# ATEN_CPU_CAPABILITY); "DEFAULT" and non-x86 reports run neither.
_RUNNABLE = {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}
ISA_ENV = "ROLLSERVE_CPU_ISA"
NO_ISA = "none"  # ROLLSERVE_CPU_ISA=none: the PyTorch path everywhere


# How each supported storage dtype is spelled for the kernels' ELEM macros.
ELEMENT_MACROS: dict[torch.dtype, dict[str, str | int]] = {
    torch.bfloat16: {"ELEM": "uint16_t", "ELEM_IS_BF16": 1},
    torch.float32: {"ELEM": "float", "ELEM_IS_BF16": 0},
}


# ctypes spellings of the kernels' C parameter types.
POINTER, INT64, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class KernelBuildError(RuntimeError):
    pass


class UnsupportedIsa(ValueError):
    """ROLLSERVE_CPU_ISA names an ISA this CPU does not run, or none the kernels know."""


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


def runnable_isas() -> tuple[str, ...]:
    """The ISAs of ISA_FLAGS this CPU runs, best first (empty: the PyTorch path only)."""
    return _RUNNABLE.get(torch.backends.cpu.get_cpu_capability(), ())


def selected_isa() -> str | None:
    """The ISA the kernels are built for: ROLLSERVE_CPU_ISA when set, else the best this CPU
    runs; None for the PyTorch path. Raises UnsupportedIsa for an ISA this CPU lacks (a
    forced ISA that silently fell back would measure or test the wrong kernels)."""
    runnable = runnable_isas()
    requested = os.environ.get(ISA_ENV, "").strip().lower()
    if not requested:
        return runnable[0] if runnable else None
    if requested == NO_ISA:
        return None
    if requested not in ISA_FLAGS:
        raise UnsupportedIsa(
            f"{ISA_ENV}={requested!r}: expected one of {', '.join((*ISA_FLAGS, NO_ISA))}"
        )
    if requested not in runnable:
        raise UnsupportedIsa(
            f"{ISA_ENV}={requested} but this CPU offers "
            f"{torch.backends.cpu.get_cpu_capability()} (it runs: "
            f"{', '.join((*runnable, NO_ISA))})"
        )
    return requested


def native_isa(device: torch.device, dtype: torch.dtype) -> str | None:
    """The ISA the native kernels serve this device and dtype with here, or None where
    they do not (why_not_native says why)."""
    return None if why_not_native(device, dtype) else selected_isa()


def why_not_native(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no native kernel serves this device and dtype here, or None when they can."""
    if device.type != "cpu":
        return f"they are CPU kernels and the engine runs on {device.type}"
    if dtype not in ELEMENT_MACROS:
        return f"they take bfloat16 or float32, not {str(dtype).removeprefix('torch.')}"
    if selected_isa() is None:
        if runnable_isas():
            return f"{ISA_ENV}={NO_ISA}"
        capability = torch.backends.cpu.get_cpu_capability()
        return f"they need AVX2 or AVX-512 and this CPU offers {capability}"
    return None


def dot_flags(dtype: torch.dtype, isa: str) -> tuple[str, ...]:
    """BF16_DOT_FLAGS for a bfloat16 build for avx512 on a CPU with AVX512_BF16, else none
    (the kernels then widen bfloat16 to float32 and use FMAs)."""
    if dtype == torch.bfloat16 and isa == "avx512" and torch.cpu._is_avx512_bf16_supported():
        return BF16_DOT_FLAGS
    return ()


def load_kernel(
    name: str, macros: dict[str, str | int], isa: str, extra_flags: tuple[str, ...] = ()
) -> ctypes.CDLL:
    """The compiled `name`.c for `isa` with `macros` defined (and `extra_flags`, such as
    instruction sets only some kernels use); raises KernelBuildError with the compiler's
    message when it cannot be built."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler ({compiler!r}) on PATH")
    sources = [(KERNEL_DIR / f"{name}.c").read_text()]
    sources += [header.read_text() for header in sorted(KERNEL_DIR.glob("*.h"))]
    defines = tuple(f"-D{key}={value}" for key, value in sorted(macros.items()))
    options = (*ISA_FLAGS[isa], *extra_flags, *defines)
    digest = hashlib.sha256(
        "\0".join((*sources, compiler, *FLAGS, *options)).encode()
    ).hexdigest()
    target = cache_dir() / "kernels" / f"{name}-{isa}-{digest[:16]}.so"
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
