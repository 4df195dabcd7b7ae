"""What every benchmark shares: timing calls (one, the median or best of several, or several
interleaved round by round), printing result tables and ratio lines, and the line that names
this machine's CPU.

Ratios print as `name: 1.23` lines so that a run's verdict can be found in its log by name.
The CPU line goes beside every result so a reader knows where a figure came from (figures
on an AMX Xeon, an AVX-512 EPYC and an AVX2-only EPYC differ by whole factors).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from rollserve.bench import emulated_isa

K = TypeVar("K")
T = TypeVar("T")

FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_bf16", "amx_tile")


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeated_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls, after `warmup` untimed ones (a first call pays for
    allocations, lazy set-up and cold caches)."""
    for _ in range(warmup):
        fn()
    return [seconds(fn) for _ in range(repeats)]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return statistics.median(repeated_seconds(fn, repeats, warmup))


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The fastest of `repeats` calls: what the hardware allows, where the median would
    also measure whatever else the machine was doing."""
    return min(repeated_seconds(fn, repeats, warmup))


def rounds(calls: Mapping[K, Callable[[], T]], count: int, *, warmup: int = 0,
           alternate: bool = False) -> Iterator[dict[K, T]]:
    """Each call once per round, in turn: `warmup` rounds whose results are dropped, then
    `count` rounds, each yielded as {key: result} in the calls' order. Interleaving spreads a
    drift of the machine's speed (on a shared VM it moves by whole factors: bench.machine)
    over all calls instead of the one that ran during it; `alternate` reverses the order in
    every other round so that no call always runs first."""
    for index in range(warmup + count):
        order = list(calls)[:: -1 if alternate and index % 2 else 1]
        results = {key: calls[key]() for key in order}
        if index >= warmup:
            yield {key: results[key] for key in calls}


def by_key(results: Iterable[Mapping[K, T]]) -> dict[K, list[T]]:
    """Rounds of {key: result} turned into each key's results, in round order."""
    columns: dict[K, list[T]] = {}
    for result in results:
        for key, value in result.items():
            columns.setdefault(key, []).append(value)
    return columns


def interleaved_median_seconds(calls: Mapping[K, Callable[[], object]],
                               repeats: int) -> dict[K, float]:
    """Each call's median seconds over `repeats` rounds of all calls, after one warm-up."""
    timed = {key: partial(seconds, call) for key, call in calls.items()}
    runs = by_key(rounds(timed, repeats, warmup=1))
    return {key: statistics.median(values) for key, values in runs.items()}


def median_item(items: Sequence[T], key: Callable[[T], float]) -> T:
    """The item whose `key` is the median (the upper one of an even count): a whole run's
    result, not a mix of figures from different runs."""
    return sorted(items, key=key)[len(items) // 2]


@dataclass(slots=True, frozen=True)
class Column:
    """One column of a printed table: its title, width, and how its values print."""

    title: str
    width: int
    spec: str = ""  # the values' format spec, such as ".1f"
    align: str = ">"


def print_table(columns: Sequence[Column], rows: Iterable[Sequence[object]], *,
                rule: bool = False) -> None:
    """The header, then each row as it comes: a generator of rows that measures each one
    shows progress on a long run."""
    header = "".join(f"{column.title:{column.align}{column.width}}" for column in columns)
    print(header)
    if rule:
        print("-" * len(header))
    for row in rows:
        print("".join(f"{value:{column.align}{column.width}{column.spec}}"
                      for column, value in zip(columns, row, strict=True)))


def print_ratio(name: str, value: float, detail: str = "") -> None:
    print(f"{name}: {value:.2f}{detail}")


def cpu_line() -> str:
    """The CPU's model, core count, which of FLAGS_THAT_MATTER it has and lacks, and the ISA
    the run emulates (bench.emulated_isa), if any."""
    model, flags = _cpuinfo()
    have = [flag for flag in FLAGS_THAT_MATTER if flag in flags]
    lacks = [flag for flag in FLAGS_THAT_MATTER if flag not in flags]
    isa = emulated_isa.emulated()
    return (f"cpu: {model}, {os.cpu_count()} cores; has {' '.join(have) or 'none of'}"
            + (f"; lacks {' '.join(lacks)}" if lacks else "")
            + (f"; EMULATING {isa} only ({emulated_isa.describe(isa)}; caches, bandwidth "
               "and clocks are this CPU's)" if isa else ""))


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
