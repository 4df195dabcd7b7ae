"""What the HTTP layer costs per streamed token: the server's event-loop CPU per SSE event,
with uvicorn on httptools + uvloop (rollserve's dependencies) against its pure-Python
fallbacks h11 + asyncio, in one run.

    python -m rollserve.bench.stream_cpu --num-prompts 256 --concurrency 64

A tiny model keeps the engine fast, so the event loop carries a full load. The peer server
is the same command with `uvloop` and `httptools` made unimportable (uvicorn then falls back
by itself); CPU time is read per thread from /proc (Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rollserve.bench.offline import Workload, make_workload
from rollserve.bench.online import model_vocab_size, run_clients, wait_healthy
from rollserve.models.local_cache import ensure_tiny_model

BLOCKED_MODULES = ("uvloop", "httptools")


@dataclass(slots=True)
class LoopCost:
    name: str
    events: int
    seconds: float
    loop_cpu_seconds: float  # the server's main thread: uvicorn's event loop

    @property
    def micros_per_event(self) -> float:
        return self.loop_cpu_seconds / self.events * 1e6


def main_thread_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_and_measure(name: str, model: Path, workload: Workload, args: argparse.Namespace,
                      env: dict[str, str]) -> LoopCost:
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "rollserve.launch_server", "--model-path", str(model),
         "--port", str(args.port), "--dtype", "bfloat16", "--disable-radix-cache",
         "--max-total-tokens", str(args.num_prompts * 500), "--log-level", "warning"],
        env=env,
    )
    try:
        wait_healthy(url, server)
        before = main_thread_cpu_seconds(server.pid)
        start = time.perf_counter()
        events = asyncio.run(run_clients(url, workload, args.concurrency))
        seconds = time.perf_counter() - start
        return LoopCost(name, events, seconds, main_thread_cpu_seconds(server.pid) - before)
    finally:
        server.terminate()
        server.wait(timeout=60)


def blocked_imports_env(folder: Path) -> dict[str, str]:
    """An environment in which BLOCKED_MODULES fail to import."""
    for module in BLOCKED_MODULES:
        (folder / f"{module}.py").write_text(
            f"raise ImportError('{module} is blocked for the peer run')\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.stream_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=31100)
    args = parser.parse_args(argv)
    model = ensure_tiny_model(args.preset)
    workload = make_workload(args.num_prompts, model_vocab_size(model), args.seed, (16, 64),
                             (200, 400))
    with tempfile.TemporaryDirectory() as blocked:
        results = [
            serve_and_measure("h11 + asyncio", model, workload, args,
                              blocked_imports_env(Path(blocked))),
            serve_and_measure("httptools + uvloop", model, workload, args, dict(os.environ)),
        ]
    print(f"model: {model}; {args.num_prompts} prompts, {args.concurrency} streams")
    print(f"{'server':<22}{'events':>9}{'seconds':>9}{'events/s':>10}{'loop CPU s':>12}"
          f"{'us/event':>10}")
    for r in results:
        print(f"{r.name:<22}{r.events:>9}{r.seconds:>9.1f}{r.events / r.seconds:>10.0f}"
              f"{r.loop_cpu_seconds:>12.1f}{r.micros_per_event:>10.0f}")
    ratio = results[1].micros_per_event / results[0].micros_per_event
    print(f"loop_cpu_per_event_vs_h11: {ratio:.2f}")


if __name__ == "__main__":
    main()
