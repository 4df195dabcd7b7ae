"""In-memory weight updates (`update_weights_from_serialized`, what `/update_weights_from_tensor`
runs) of a whole checkpoint into an engine of tp_size 1 and of a larger tp_size, each in a
process of its own, one after the other in one run.

    python -m rollserve.bench.tensor_update --preset qwen2.5-0.5b --tp-size 2 --repeats 6

Each push serializes the checkpoint's tensors (SGLang's form, one payload per TP rank) and
times the call from the request to the answer, after which every rank serves the new
weights. The first two pushes of an engine fault in fresh memory and are shown but not in
the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from rollserve.bench.timing import Column, cpu_line, print_ratio, print_table
from rollserve.models.loader import iter_checkpoint_tensors
from rollserve.models.local_cache import ensure_tiny_model
from rollserve.weights.ipc import serialize_named_tensors

WARM_PUSHES = 2
COLUMNS = [Column("tp_size", 8), Column("median s", 10, ".2f"),
           Column("   each push, s", 60, align="<")]


def push_times(preset: str, tp_size: int, repeats: int) -> list[float]:
    from rollserve import Engine  # after argument parsing: the child's own torch

    path = ensure_tiny_model(preset)
    tensors = list(iter_checkpoint_tensors(path))
    with Engine(str(path), tp_size=tp_size, max_total_tokens=4096) as engine:
        times = []
        for _ in range(WARM_PUSHES + repeats):
            payloads = [serialize_named_tensors(tensors) for _ in range(tp_size)]
            start = time.perf_counter()
            engine.update_weights_from_serialized(payloads)
            times.append(time.perf_counter() - start)
            print(f"tp_size {tp_size}: push {len(times)} took {times[-1]:.2f} s",
                  file=sys.stderr, flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.tensor_update",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--tp-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(push_times(args.preset, args.tp_size, args.repeats)))
        return
    medians = {}
    rows = []
    for tp_size in (1, args.tp_size):
        done = subprocess.run(
            [sys.executable, "-m", "rollserve.bench.tensor_update", "--child", "--preset",
             args.preset, "--tp-size", str(tp_size), "--repeats", str(args.repeats)],
            check=True, stdout=subprocess.PIPE, text=True)
        times = json.loads(done.stdout.strip().splitlines()[-1])
        medians[tp_size] = statistics.median(times[WARM_PUSHES:])
        rows.append((tp_size, medians[tp_size], "   " + " ".join(f"{t:.2f}" for t in times)))
    print(cpu_line())
    print_table(COLUMNS, rows, rule=True)
    print_ratio(f"tp{args.tp_size}_push_vs_tp1", medians[args.tp_size] / medians[1])


if __name__ == "__main__":
    main()
