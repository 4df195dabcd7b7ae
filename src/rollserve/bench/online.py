"""Online throughput: the offline benchmark's workload through HTTP with K concurrent
streaming clients, against the in-process engine on the same workload, in one run.

    python -m rollserve.bench.online --preset qwen2.5-0.5b --num-prompts 128 --concurrency 64 \
        --repeats 3

The server runs as its own process (`python -m rollserve.launch_server`) so the HTTP layer,
the engine and the client are measured as users deploy them. Three rows: the offline engine
with every request submitted at once, the offline engine capped at K running requests (the
same concurrency the clients allow), and the HTTP server; ratios for both.

    python -m rollserve.bench.online --preset qwen2.5-0.5b --compare vllm --repeats 3

runs the same K streaming clients against rollserve's server and vLLM's OpenAI server (its
CPU build from bench.vllm_env, with its recommended settings), both through the OpenAI
`/v1/completions` API with token-id prompts, the same engine limits and KV-cache bytes and no
prefix caching, and prints `speedup_vs_vllm` last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import aiohttp

from rollserve import Engine
from rollserve.bench import emulated_isa
from rollserve.bench.offline import (
    RunResult,
    Workload,
    kv_tokens,
    make_workload,
    print_results,
    run_engine,
)
from rollserve.bench.timing import by_key, cpu_line, median_item, print_ratio, rounds
from rollserve.bench.vllm_env import ensure_vllm_python, recommended_env
from rollserve.engine.args import DEFAULT_CHUNKED_PREFILL_SIZE
from rollserve.models.config import load_model_config
from rollserve.models.loader import resolve_device, resolve_dtype
from rollserve.models.local_cache import ensure_tiny_model
from rollserve.utils.dtypes import dtype_name


async def _stream_one(session: aiohttp.ClientSession, url: str, prompt: list[int],
                      max_new_tokens: int) -> int:
    body = {"input_ids": prompt, "stream": True, "sampling_params": {
        "temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}
    last: dict = {}
    async with session.post(url + "/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])
    return len(last["output_ids"])


async def _stream_completion(session: aiohttp.ClientSession, url: str, prompt: list[int],
                             max_new_tokens: int) -> int:
    """One streamed OpenAI completion; the server's own count of the tokens it sent."""
    body = {"model": "peer", "prompt": prompt, "max_tokens": max_new_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage: dict = {}
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage["completion_tokens"]


async def run_clients(url: str, workload: Workload, concurrency: int,
                      stream_one: Callable = _stream_one) -> int:
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def one(prompt: list[int], n: int) -> int:
        async with gate:
            return await stream_one(session, url, prompt, n)

    async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        counts = await asyncio.gather(*(one(p, n) for p, n in
                                        zip(workload.prompts, workload.output_lens, strict=True)))
    return sum(counts)


def run_online(model: Path, workload: Workload, concurrency: int, args: argparse.Namespace,
               port: int, env: Mapping[str, str] | None = None,
               name: str | None = None, max_total_tokens: int | None = None,
               stream_one: Callable = _stream_one) -> RunResult:
    """One server process (with `env` added to this process's environment) and the clients."""
    command = [sys.executable, "-m", "rollserve.launch_server", "--model-path", str(model),
               "--port", str(port), "--dtype", args.dtype, "--device", args.device,
               "--max-total-tokens", str(max_total_tokens or args.num_prompts * 800),
               "--disable-radix-cache", "--chunked-prefill-size", str(args.chunked_prefill_size),
               "--log-level", "warning"]
    return run_server(command, {**os.environ, **(env or {})}, port, workload, concurrency,
                      name or f"http, {concurrency} streams", stream_one)


def run_server(command: list[str], env: Mapping[str, str], port: int, workload: Workload,
               concurrency: int, name: str, stream_one: Callable) -> RunResult:
    """Starts `command` (a server on `port`), times the clients' run, stops the server."""
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(command, env=dict(env), start_new_session=True)
    try:
        wait_healthy(url, server, timeout=900)
        start = time.perf_counter()
        produced = asyncio.run(run_clients(url, workload, concurrency, stream_one))
        seconds = time.perf_counter() - start
    finally:
        stop_group(server)
    assert produced == workload.output_tokens, f"{name} produced other lengths than asked"
    return RunResult(name, len(workload.prompts), workload.input_tokens, produced, seconds)


def stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server, which stops its own children (a signal to the whole group would
    also end its resource tracker before the children's shared memory is released); then
    SIGKILL to whatever of its process group is left, so nothing outlives the run."""
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)


def run_vllm_server(model: Path, workload: Workload, args: argparse.Namespace,
                    kv_gib: int) -> RunResult:
    python = ensure_vllm_python()
    settings = recommended_env(python, kv_gib)
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(args.port + 1),
               "--dtype", _dtype_name(model, args), "--max-num-seqs", "256",
               "--max-num-batched-tokens", str(args.chunked_prefill_size),
               "--max-model-len", str(512 + 256), "--no-enable-prefix-caching",
               "--served-model-name", "peer"]
    print("vLLM settings: " + " ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    return run_server(command, {**os.environ, **settings}, args.port + 1, workload,
                      args.concurrency, f"vllm http, {args.concurrency} streams",
                      _stream_completion)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            if requests.get(url + "/health", timeout=1, proxies={"http": None}).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become healthy")


def _offline(model: Path, workload: Workload, args: argparse.Namespace, cap: int,
             name: str) -> RunResult:
    with Engine(str(model), dtype=args.dtype, device=args.device,
                max_total_tokens=args.num_prompts * 800, max_running_requests=cap,
                chunked_prefill_size=args.chunked_prefill_size,
                disable_radix_cache=True) as engine:
        engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
        return replace(run_engine(engine, workload), name=name)


def workload_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The model, workload, client and server options of the online benchmarks."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--model-path")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunked-prefill-size", type=int, default=DEFAULT_CHUNKED_PREFILL_SIZE)
    parser.add_argument("--port", type=int, default=31000)
    emulated_isa.add_emulate_isa(parser)
    return parser


def online_workload(args: argparse.Namespace) -> tuple[Path, Workload]:
    """The model and bench.offline's workload for it, from workload_parser's options."""
    model = Path(args.model_path) if args.model_path else ensure_tiny_model(args.preset)
    return model, make_workload(args.num_prompts, load_model_config(model).vocab_size,
                                args.seed, (64, 512), (32, 256))


def _dtype_name(model: Path, args: argparse.Namespace) -> str:
    """The dtype the engines compute in (`auto` resolves per checkpoint and CPU)."""
    device = resolve_device(args.device)
    return dtype_name(resolve_dtype(args.dtype, load_model_config(model), device))


def main(argv: list[str] | None = None) -> None:
    parser = workload_parser("python -m rollserve.bench.online", __doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the three configurations this many times, interleaved (every "
                             "other round in reverse order), and report each one's median and "
                             "the ratio of total seconds (the VM's speed drifts between runs)")
    parser.add_argument("--peer-src", type=Path,
                        help="also run the server from this source tree (say, an earlier "
                             "commit's `src`, from `git worktree add`) as a fourth row, "
                             "interleaved with the others")
    parser.add_argument("--compare", choices=["vllm", "none"], default="none",
                        help="vllm: rollserve's server against vLLM's OpenAI server instead")
    args = parser.parse_args(argv)
    emulated_isa.run_emulated(args.emulate_isa, "rollserve.bench.online", argv)
    model, workload = online_workload(args)
    if args.compare == "vllm":
        compare_vllm(model, workload, args)
        return
    configurations: dict[str, Callable[[], RunResult]] = {
        "offline": lambda: _offline(model, workload, args, 256, "offline engine"),
        "capped": lambda: _offline(model, workload, args, args.concurrency,
                                   f"offline, {args.concurrency} running"),
        "http": lambda: run_online(model, workload, args.concurrency, args, args.port),
    }
    if args.peer_src:
        peer_env = {"PYTHONPATH": os.pathsep.join(
            [str(args.peer_src.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])}
        configurations["peer"] = lambda: run_online(model, workload, args.concurrency, args,
                                                    args.port, peer_env, "http, peer src")
    per_round = list(rounds(configurations, args.repeats, alternate=True))
    results, totals = _medians(per_round), _total_seconds(per_round)
    if args.repeats > 1:
        _print_rounds(per_round)
        # The medians may come from different rounds; these pair each round with itself.
        print("online_vs_offline per round:",
              [round(rnd["offline"].seconds / rnd["http"].seconds, 2) for rnd in per_round])
        print_ratio("online_vs_offline over all rounds (total seconds)",
                    totals["offline"] / totals["http"])
        print_ratio("online_vs_offline_same_concurrency over all rounds (total seconds)",
                    totals["capped"] / totals["http"])
        if args.peer_src:
            print_ratio("http_vs_peer_src over all rounds (total seconds)",
                        totals["peer"] / totals["http"])
    print(f"model: {model} ({_dtype_name(model, args)}, {args.device}); "
          f"{args.num_prompts} prompts")
    print(cpu_line())
    print_results(list(results.values()))
    online = results["http"].output_throughput
    print_ratio("online_vs_offline", online / results["offline"].output_throughput)
    print_ratio("online_vs_offline_same_concurrency",
                online / results["capped"].output_throughput)


def compare_vllm(model: Path, workload: Workload, args: argparse.Namespace,
                 kv_gib: int = 2) -> None:
    tokens = kv_tokens(model, args.dtype, args.device, kv_gib)
    configurations: dict[str, Callable[[], RunResult]] = {
        "rollserve": lambda: run_online(model, workload, args.concurrency, args, args.port,
                                        name=f"rollserve http, {args.concurrency} streams",
                                        max_total_tokens=tokens, stream_one=_stream_completion),
        "vllm": lambda: run_vllm_server(model, workload, args, kv_gib),
    }
    per_round = list(rounds(configurations, args.repeats, alternate=True))
    results, totals = _medians(per_round), _total_seconds(per_round)
    _print_rounds(per_round)
    print(f"model: {model} ({_dtype_name(model, args)}, {args.device}); "
          f"{args.num_prompts} prompts; KV cache {kv_gib} GiB each")
    print(cpu_line())
    print_results(list(results.values()))
    print_ratio("speedup_vs_vllm over all rounds (total seconds)",
                totals["vllm"] / totals["rollserve"])
    print_ratio("speedup_vs_vllm",
                results["rollserve"].output_throughput / results["vllm"].output_throughput)


def _medians(per_round: list[dict[str, RunResult]]) -> dict[str, RunResult]:
    """Each configuration's median run (by seconds)."""
    return {key: median_item(runs, key=lambda r: r.seconds)
            for key, runs in by_key(per_round).items()}


def _total_seconds(per_round: list[dict[str, RunResult]]) -> dict[str, float]:
    """Each configuration's seconds over all rounds: a ratio of these weighs every round
    alike, where the VM's speed drifts between rounds."""
    return {key: sum(r.seconds for r in runs) for key, runs in by_key(per_round).items()}


def _print_rounds(per_round: list[dict[str, RunResult]]) -> None:
    print("seconds per round:", [[round(r.seconds, 1) for r in rnd.values()] for rnd in per_round])

if __name__ == "__main__":
    main()
