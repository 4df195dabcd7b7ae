"""The engine demo: a few chat prompts through the in-process engine, then throughput."""

from __future__ import annotations

import argparse
import time

from rollserve.engine.engine import Engine
from rollserve.models.local_cache import ensure_tiny_model

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about reinforcement learning.",
    "Explain continuous batching in one sentence.",
    "List three prime numbers.",
)


def run_demo(preset: str = "qwen2", num_requests: int = 64, max_new_tokens: int = 64) -> None:
    path = ensure_tiny_model(preset)
    print(f"model: {path} (random weights: the text is gibberish, the serving is real)")
    with Engine(str(path), device="cpu", max_total_tokens=32768) as engine:
        chats = [
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in PROMPTS
        ]
        params = {"temperature": 0.8, "max_new_tokens": max_new_tokens, "sampling_seed": 0}
        for prompt, out in zip(PROMPTS, engine.generate(chats, params), strict=True):
            print(f"\n> {prompt}\n{out['text']!r}\n  ({out['meta_info']['finish_reason']})")
        batch = [chats[i % len(chats)] for i in range(num_requests)]
        start = time.perf_counter()
        outputs = engine.generate(batch, {**params, "ignore_eos": True})
        seconds = time.perf_counter() - start
        stats = engine.stats()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    cached = sum(o["meta_info"]["cached_tokens"] for o in outputs)
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outputs)
    print(f"\n{'requests':>9}{'out tokens':>12}{'seconds':>10}{'out tok/s':>11}"
          f"{'cache hit':>11}{'max batch':>11}")
    print(f"{len(outputs):>9}{tokens:>12}{seconds:>10.2f}{tokens / seconds:>11.1f}"
          f"{cached / prompt_tokens:>11.0%}{stats['max_running']:>11}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rollserve demo", description=__doc__)
    parser.add_argument("--preset", default="qwen2")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    run_demo(args.preset, args.num_requests, args.max_new_tokens)
