"""How long the idle OpenMP workers of an engine process spin before they sleep.

An engine keeps one OpenMP team (its thread runs all tensor work, see Engine._run), and a
decode step calls a few hundred kernels with 10-30 us of Python between them. Workers that
sleep in those gaps pay a wake-up per kernel: 8-14% of a decode step here
(`python -m rollserve.bench.openmp_teams`). libgomp's default spin, 300000 rounds (~5 ms
on this CPU), covers the gaps but keeps each worker burning a core for milliseconds after
every step; engines and trainers sharing the cores then spin against each other (the
colocated weight-sync tests took 2-4x longer, and some timed out). 3000 rounds (~50 us)
covers the gaps and leaves the cores to others between steps (BENCHMARKS.md).

libgomp reads GOMP_SPINCOUNT once, when torch loads it: the processes rollserve starts for
engines (`python -m rollserve.launch_server`, `rollserve serve`) set it before importing
torch. A process that imports torch first keeps libgomp's default.
"""

from __future__ import annotations

import os

ENGINE_SPIN_COUNT = 3000


def configure_engine_process() -> None:
    """Default GOMP_SPINCOUNT to ENGINE_SPIN_COUNT (a value set by the user wins). Takes
    effect only before torch is imported; child processes inherit it either way."""
    os.environ.setdefault("GOMP_SPINCOUNT", str(ENGINE_SPIN_COUNT))
