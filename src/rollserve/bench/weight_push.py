"""Weight-sync bandwidth: `WeightSync.push` of a model's bf16 weights into two running engine
servers, next to a bare `torch.distributed.broadcast` of the same tensors in a group of the
same size (1 trainer + 2 receiver processes), interleaved in one run.

    python -m rollserve.bench.weight_push --preset qwen2.5-0.5b --repeats 5

A push is timed from the first POST to the last engine's answer: validation, the HTTP round
trips, the broadcast and installing the weights, after which the engines serve them. The
engines then make the weights' oneDNN-prepacked forms on their own threads; the bench waits
for that (reported as "repacked after", not counted in the push) before the next measurement.
The bare broadcast receives into buffers allocated once and ends with an all-reduce so that
every receiver has everything. Each push sends the same tensors (the timing does not depend
on the values); the first round is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from rollserve.bench.online import wait_healthy
from rollserve.bench.timing import cpu_line, rounds, seconds
from rollserve.client import InferenceHTTPClient
from rollserve.models.loader import iter_checkpoint_tensors
from rollserve.models.local_cache import ensure_tiny_model
from rollserve.rl import WeightSync
from rollserve.utils.process import free_port
from rollserve.weights.group import destroy_weights_group, init_weights_group

NUM_ENGINES = 2


@dataclass(slots=True)
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)
    repacked: list[float] = field(default_factory=list)  # push + until engines repacked


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.weight_push",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=512)
    args = parser.parse_args(argv)
    path = ensure_tiny_model(args.preset)
    tensors = [(n, t.to(torch.bfloat16).contiguous()) for n, t in iter_checkpoint_tensors(path)]
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    print(cpu_line())
    print(f"{args.preset}: {len(tensors)} tensors, {nbytes / 1e9:.3f} GB bf16; "
          f"{NUM_ENGINES} engines; {args.repeats} timed rounds", flush=True)
    servers = [_start_server(path) for _ in range(NUM_ENGINES)]
    try:
        for url, process in servers:
            wait_healthy(url, process)
        rows = _measure(tensors, [url for url, _ in servers], args)
    finally:
        for _, process in servers:
            process.terminate()
            process.wait(timeout=60)
    _print_table(rows, nbytes)


def _measure(tensors: list[tuple[str, torch.Tensor]], urls: list[str],
             args: argparse.Namespace) -> list[Row]:
    bucket_bytes = args.bucket_mb * 2**20
    rows = {"push": Row(f"WeightSync.push, {len(urls)} engines"),
            "flat": Row(f"WeightSync.push flatten=True, {len(urls)} engines"),
            "bare": Row(f"bare broadcast, 1 + {NUM_ENGINES} ranks")}
    shapes = [(tuple(t.shape), t.dtype) for _, t in tensors]
    port = free_port()
    context = mp.get_context("spawn")
    receivers = [context.Process(target=_receive, args=(port, rank, shapes, args.repeats + 1))
                 for rank in range(1, NUM_ENGINES + 1)]
    for receiver in receivers:
        receiver.start()
    group = init_weights_group(master_address="127.0.0.1", master_port=port, rank=0,
                               world_size=NUM_ENGINES + 1, group_name="bare")
    try:
        with WeightSync(urls, group_name="bench", bucket_bytes=bucket_bytes) as sync, \
                WeightSync(urls, group_name="bench_flat", bucket_bytes=bucket_bytes,
                           flatten=True) as flat_sync:
            calls = {"push": lambda: _time_push(sync, tensors, urls),
                     "flat": lambda: _time_push(flat_sync, tensors, urls),
                     "bare": lambda: (seconds(lambda: _broadcast(tensors, group)), None)}
            for index, measured in enumerate(rounds(calls, args.repeats, warmup=1), start=1):
                _record(rows, measured)
                print(f"round {index}: " + ", ".join(f"{s:.3f}s" for s, _ in measured.values()),
                      flush=True)
    finally:
        destroy_weights_group(group)
        for receiver in receivers:
            receiver.join(timeout=60)
    return list(rows.values())


def _record(rows: dict[str, Row], measured: dict[str, tuple[float, float | None]]) -> None:
    """One round's (seconds, repacked-after seconds or None) into each row."""
    for key, (pushed, repacked) in measured.items():
        rows[key].seconds.append(pushed)
        if repacked is not None:
            rows[key].repacked.append(repacked)


def _broadcast(tensors: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup) -> None:
    for _, tensor in tensors:
        dist.broadcast(tensor, src=0, group=group)
    dist.all_reduce(torch.zeros(1), group=group)  # every receiver has everything


def _receive(port: int, rank: int, shapes: list[tuple[tuple[int, ...], torch.dtype]],
             rounds: int) -> None:
    group = init_weights_group(master_address="127.0.0.1", master_port=port, rank=rank,
                               world_size=NUM_ENGINES + 1, group_name="bare")
    buffers = [torch.empty(shape, dtype=dtype) for shape, dtype in shapes]
    for _ in range(rounds):
        for buffer in buffers:
            dist.broadcast(buffer, src=0, group=group)
        dist.all_reduce(torch.zeros(1), group=group)
    destroy_weights_group(group)


def _time_push(sync: WeightSync, tensors: list[tuple[str, torch.Tensor]],
               urls: list[str]) -> tuple[float, float]:
    """Seconds until push() returned, and until every engine had repacked the weights."""
    start = time.perf_counter()
    sync.push(tensors)
    pushed = time.perf_counter() - start
    clients = [InferenceHTTPClient(url) for url in urls]
    while any(c.get("/get_server_info")["internal_states"][0]["unpacked_weights"]
              for c in clients):
        time.sleep(0.005)
    return pushed, time.perf_counter() - start


def _start_server(path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([
        sys.executable, "-m", "rollserve.launch_server", "--model-path", str(path),
        "--port", str(port), "--dtype", "bfloat16", "--device", "cpu",
        "--max-total-tokens", "4096", "--log-level", "warning"])
    return url, process


def _print_table(rows: list[Row], nbytes: int) -> None:
    bare = _median(rows[-1].seconds)
    print("\n| method | median s | GB/s | bandwidth vs bare broadcast | repacked after s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        seconds, repacked = _median(row.seconds), _median(row.repacked)
        print(f"| {row.name} | {seconds:.3f} | {nbytes / seconds / 1e9:.2f} | "
              f"{bare / seconds:.2f} | {'-' if repacked is None else f'{repacked:.3f}'} |")


if __name__ == "__main__":
    main()
