"""Client overhead: InferenceHTTPClient vs openai.AsyncOpenAI against the same server.

    python -m rollserve.bench.client --num-requests 5000

Each request asks for one token, so the server is quick and the client's own cost shows.
Both clients fan out with `--concurrency` requests in flight; reported: requests/s and the
client process's CPU seconds per 1,000 requests (the server is a separate process).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from rollserve.bench.online import wait_healthy
from rollserve.client import InferenceHTTPClient
from rollserve.models.local_cache import ensure_tiny_model


@dataclass(slots=True, frozen=True)
class ClientResult:
    name: str
    requests: int
    seconds: float
    cpu_seconds: float


async def _fan_out(call: Callable[[int], Awaitable[object]], total: int,
                   concurrency: int) -> None:
    cursor = iter(range(total))

    async def worker() -> None:
        for i in cursor:
            await call(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _rollserve(url: str, total: int, concurrency: int) -> None:
    async with InferenceHTTPClient(url) as client:
        await _fan_out(lambda i: client.async_generate(
            prompt=f"request {i}", sampling_params={"max_new_tokens": 1}), total, concurrency)


async def _openai(url: str, total: int, concurrency: int) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none",
                                  max_retries=0) as client:
        await _fan_out(lambda i: client.completions.create(
            model="default", prompt=f"request {i}", max_tokens=1), total, concurrency)


def _measure(name: str, run: Callable[[], Awaitable[None]], total: int) -> ClientResult:
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(run())
    return ClientResult(name, total, time.perf_counter() - wall, time.process_time() - cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.client",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--preset", default="qwen2")
    parser.add_argument("--port", type=int, default=31100)
    args = parser.parse_args(argv)
    model: Path = ensure_tiny_model(args.preset)
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "rollserve.launch_server", "--model-path",
                               str(model), "--port", str(args.port), "--device", "cpu",
                               "--max-total-tokens", "65536", "--log-level", "warning"])
    try:
        wait_healthy(url, server)
        n, k = args.num_requests, args.concurrency
        results = [
            _measure("rollserve InferenceHTTPClient", lambda: _rollserve(url, n, k), n),
            _measure("openai.AsyncOpenAI", lambda: _openai(url, n, k), n),
        ]
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{args.num_requests} requests, max_new_tokens=1, {args.concurrency} in flight, "
          f"model {model}")
    print(f"{'client':<32}{'req/s':>10}{'client CPU s / 1k req':>24}")
    for r in results:
        print(f"{r.name:<32}{r.requests / r.seconds:>10.1f}"
              f"{r.cpu_seconds / r.requests * 1000:>24.2f}")
    ours, theirs = results
    print(f"cpu_per_request_vs_openai: "
          f"{(ours.cpu_seconds / ours.requests) / (theirs.cpu_seconds / theirs.requests):.2f}")


if __name__ == "__main__":
    main()
