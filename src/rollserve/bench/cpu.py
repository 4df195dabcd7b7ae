"""One line naming this machine's CPU and the instruction sets that decide which kernels and
dtypes run fast, printed beside every benchmark result so a reader knows where a figure
came from (figures on an AMX Xeon, an AVX-512 EPYC and an AVX2-only EPYC differ by whole
factors)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_bf16", "amx_tile")


def cpu_line() -> str:
    model, flags = _cpuinfo()
    have = [flag for flag in FLAGS_THAT_MATTER if flag in flags]
    lacks = [flag for flag in FLAGS_THAT_MATTER if flag not in flags]
    return (f"cpu: {model}, {os.cpu_count()} cores; has {' '.join(have) or 'none of'}"
            + (f"; lacks {' '.join(lacks)}" if lacks else ""))


def _cpuinfo() -> tuple[str, set[str]]:
    """The model name and flags of the first processor in /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine()):
            model = value.strip()
        if key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags
