"""What a second OpenMP thread team costs the engine's decode steps, in one process.

    python -m rollserve.bench.openmp_teams --preset qwen2.5-0.5b --rows 1 64 --rounds 3

libgomp keeps a team of worker threads for every thread that ever ran a parallel region.
Once the process holds more team threads than cores, it stops spinning between regions, so
every kernel of a step pays a sleep and a wake-up. The engine therefore builds its model and
runs all tensor work on its own thread (Engine._run). This benchmark measures the decode
step with only the engine's team, and with one more team held by an idle helper thread (as
a caller thread that loads or casts weights would leave behind), interleaved round by round;
the helper exits after each measurement, which frees its team.
"""

from __future__ import annotations

import argparse
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rollserve import Engine
from rollserve.models.local_cache import ensure_tiny_model
from rollserve.utils.dtypes import dtype_name

PROMPT_LEN = 256


@contextmanager
def second_team() -> Iterator[None]:
    """An idle thread holding an OpenMP team for the duration."""
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        torch.ones(1 << 22).sum()  # large enough that ATen runs it as a parallel region
        ready.set()
        release.wait()

    helper = threading.Thread(target=hold, name="openmp-team-holder")
    helper.start()
    ready.wait()
    try:
        yield
    finally:
        release.set()
        helper.join()


def decode_ms_per_step(engine: Engine, rows: int, steps: int, seed: int) -> float:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(rows)]
    before = engine.stats()
    engine.generate(input_ids=prompts, sampling_params={
        "temperature": 0.0, "max_new_tokens": steps + 1, "ignore_eos": True})
    after = engine.stats()
    decode_steps = ((after["steps"] - after["prefill_steps"])
                    - (before["steps"] - before["prefill_steps"]))
    return 1000 * (after["decode_step_seconds"] - before["decode_step_seconds"]) / decode_steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.openmp_teams",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--model-path", help="a checkpoint instead of the preset")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = Path(args.model_path) if args.model_path else ensure_tiny_model(args.preset)
    engine = Engine(str(path), dtype=args.dtype, device="cpu",
                    max_total_tokens=max(args.rows) * (PROMPT_LEN + args.steps + 16),
                    max_running_requests=max(args.rows), disable_radix_cache=True)
    engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})  # warm-up
    print(f"model: {path} ({dtype_name(engine.dtype)}, cpu, {torch.get_num_threads()} threads); "
          f"{args.steps} decode steps per measurement, prompts of {PROMPT_LEN} tokens")
    header = f"{'rows':>5}{'round':>7}{'engine team only':>18}{'+ a second team':>17}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    totals: dict[int, list[float]] = {rows: [0.0, 0.0] for rows in args.rows}
    for round_ in range(args.rounds):
        for rows in args.rows:
            alone = decode_ms_per_step(engine, rows, args.steps, round_)
            with second_team():
                shared = decode_ms_per_step(engine, rows, args.steps, round_)
            totals[rows][0] += alone
            totals[rows][1] += shared
            print(f"{rows:>5}{round_:>7}{alone:>15.1f} ms{shared:>14.1f} ms"
                  f"{shared / alone:>8.2f}")
    engine.shutdown()
    for rows, (alone, shared) in totals.items():
        print(f"rows {rows}: second_team_vs_alone: {shared / alone:.2f} "
              f"({alone / args.rounds:.1f} -> {shared / args.rounds:.1f} ms per decode step)")


if __name__ == "__main__":
    main()
