"""What this machine gives a decode step right now: memory read bandwidth, how close the
weight stream of a one-row step comes to it, and how much the matmul speed drifts.

    python -m rollserve.bench.machine --seconds 10

Run it next to a benchmark to read that benchmark's spread. The read bandwidth is a
two-thread `torch.sum` over 1 GB (the peer); the weight stream is Qwen2.5-0.5B's linears and
lm_head (988 MB, bench.cpu_kernels' weights) at one row through the layer-by-layer path's
matmuls (oneDNN, or the AMX kernel; the engine's steps of 1-3 rows use decode_layers'). The
drift probe repeats one bf16 prefill-sized matmul (oneDNN, AMX) and reports its speed in
one-second windows: on a shared VM it moves by whole factors while the code stays the same.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rollserve.bench.cpu_kernels import forward_linears, model_weights
from rollserve.bench.offline import read_bandwidth
from rollserve.bench.timing import Column, best_seconds, cpu_line, print_ratio, print_table, seconds
from rollserve.kernels.amx_linear import make_amx_linear
from rollserve.models.linear import linear, pack

READ_BYTES = 1 << 30
DRIFT_SHAPE = (363, 896, 4864)  # rows, k, n: one prompt's chunk through a gate projection


def read_bandwidth_with(data: torch.Tensor, threads: int) -> float:
    """Best-of bytes/s of summing `data` with `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return read_bandwidth(data)
    finally:
        torch.set_num_threads(previous)


def weight_stream(repeats: int = 5) -> tuple[float, int]:
    """Best-of seconds for one row through every linear, and the bytes they read."""
    weights = model_weights()
    amx = make_amx_linear(torch.device("cpu"), torch.bfloat16)
    best = best_seconds(forward_linears(weights, 1, amx), repeats, warmup=0)
    return best, sum(w.numel() * w.element_size() for w, _ in weights)


def matmul_drift(duration: float) -> list[float]:
    """Median microseconds per row of the drift matmul in each one-second window."""
    rows, k, n = DRIFT_SHAPE
    weights = [(torch.randn(n, k) * 0.02).to(torch.bfloat16) for _ in range(4)]
    packed = [(w, pack(w)) for w in weights]
    x = torch.randn(rows, k).to(torch.bfloat16)
    windows: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        window_start, samples = time.perf_counter(), []
        while time.perf_counter() - window_start < 1.0:
            samples.append(seconds(lambda: [linear(x, w, p) for w, p in packed]))
        windows.append(statistics.median(samples) / len(packed) / rows * 1e6)
    return windows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.machine",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    data = torch.ones(READ_BYTES // 4, dtype=torch.float32)
    one, two = read_bandwidth_with(data, 1), read_bandwidth_with(data, 2)
    del data
    stream_seconds, stream_bytes = weight_stream()
    windows = matmul_drift(args.seconds)
    stream = stream_bytes / stream_seconds
    print(cpu_line())
    print_table([Column("measure", 44, align="<"), Column("value", 12)], [
        ("read bandwidth, 1 thread (GB/s)", f"{one / 1e9:.1f}"),
        ("read bandwidth, 2 threads (GB/s)", f"{two / 1e9:.1f}"),
        ("one-row weight stream (ms)", f"{stream_seconds * 1e3:.1f}"),
        ("one-row weight stream (GB/s)", f"{stream / 1e9:.1f}"),
        ("drift matmul, fastest second (us/row)", f"{min(windows):.2f}"),
        ("drift matmul, slowest second (us/row)", f"{max(windows):.2f}"),
    ])
    print("drift matmul per second (us/row): " + " ".join(f"{w:.1f}" for w in windows))
    print_ratio("weight_stream_vs_read_bandwidth", stream / two)
    print_ratio("matmul_drift_slowest_vs_fastest", max(windows) / min(windows))


if __name__ == "__main__":
    main()
