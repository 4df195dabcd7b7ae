"""Offline throughput: the engine against HF transformers `generate` on the same workload.

    python -m rollserve.bench.offline --preset qwen2.5-0.5b --num-prompts 128 --compare hf

Workload: prompt lengths uniform in [64, 512], output lengths uniform in [32, 256], random
token ids, ignore_eos, greedy, fixed seed. The HF peer takes requests in arrival order in
batches of `--hf-batch-size` with left padding, runs each batch to its longest target and
is credited only with each request's own target tokens.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rollserve import Engine
from rollserve.engine.args import DEFAULT_CHUNKED_PREFILL_SIZE
from rollserve.models.local_cache import ensure_tiny_model
from rollserve.weight_specs import dtype_name


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


def batch1_decode_rate(engine: Engine, vocab_size: int, new_tokens: int = 64) -> float:
    """Decode tokens per second of a lone request, timed from its first token to its last."""
    prompt = [random.Random(1).randrange(vocab_size) for _ in range(64)]
    _, inputs = engine.prepare(None, {"temperature": 0.0, "max_new_tokens": new_tokens,
                                      "ignore_eos": True}, prompt)
    stamps: list[float] = []
    done = threading.Event()

    def on_output(_index: int, _output: dict, finished: bool) -> None:
        stamps.append(time.perf_counter())
        if finished:
            done.set()

    engine.submit(inputs, on_output, stream=True)
    done.wait()
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def read_bandwidth(data: torch.Tensor, repeats: int = 5) -> float:
    """Best-of bytes/s of summing `data`: the ceiling of a step that streams its weights.
    (A copy's bandwidth halved understated it 2x on a VM: its writes cost more than reads.)"""
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(data.device)
        start = time.perf_counter()
        data.sum()
        _synchronize(data.device)
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(engine: Engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def print_table(results: list[RunResult]) -> None:
    header = (f"{'run':<28}{'requests':>9}{'out tokens':>12}{'seconds':>10}{'out tok/s':>11}"
              f"{'total tok/s':>13}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<28}{r.requests:>9}{r.output_tokens:>12}{r.seconds:>10.1f}"
              f"{r.output_throughput:>11.1f}{r.total_throughput:>13.1f}")


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
    parser.add_argument("--compare", choices=["hf", "none"], default="none")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = Path(args.model_path) if args.model_path else ensure_tiny_model(args.preset)
    engine = Engine(
        str(path), dtype=args.dtype, device=args.device,
        max_total_tokens=args.max_total_tokens or args.num_prompts * 800,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size, disable_radix_cache=True,
        disable_native_kernels=args.disable_native_kernels,
    )
    vocab = engine.model_config.vocab_size
    workload = make_workload(args.num_prompts, vocab, args.seed, tuple(args.prompt_len),
                             tuple(args.output_len))
    engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})  # warm-up
    before = engine.stats()
    results = [run_engine(engine, workload)]
    stats = engine.stats()
    steps = {key: stats[key] - before[key]
             for key in ("steps", "prefill_steps", "prefill_step_seconds", "decode_step_seconds")}
    decode_rate = batch1_decode_rate(engine, vocab)
    device, dtype = next(engine.model.parameters()).device, engine.dtype
    floor = read_bandwidth(torch.ones(2**28, device=device)) / weight_bytes(engine)
    engine.shutdown()
    if args.compare == "hf":
        results.append(run_hf(path, workload, args.hf_batch_size, dtype, str(device)))
    print(f"model: {path} ({dtype_name(dtype)}, {device}); "
          f"{args.num_prompts} prompts, "
          f"prompt len {tuple(args.prompt_len)}, output len {tuple(args.output_len)}, "
          f"seed {args.seed}")
    print_table(results)
    print(f"largest running batch: {stats['max_running']}")
    print(f"engine steps: {steps['prefill_steps']} with prefill "
          f"{steps['prefill_step_seconds']:.1f} s, "
          f"{steps['steps'] - steps['prefill_steps']} decode-only "
          f"{steps['decode_step_seconds']:.1f} s")
    print(f"batch-1 decode: {decode_rate:.1f} tok/s; memory-bandwidth floor "
          f"(weight bytes / read bandwidth): {floor:.1f} tok/s")
    if len(results) > 1:
        print(f"speedup_vs_hf: {results[0].output_throughput / results[1].output_throughput:.2f}")


if __name__ == "__main__":
    main()
