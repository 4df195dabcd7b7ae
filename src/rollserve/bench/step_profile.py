"""Where an engine's step time goes, on bench.offline's workload: Python functions of the
engine thread (cProfile) and the operators and kernels (torch profiler).

    python -m rollserve.bench.step_profile --device cuda --num-prompts 64

A diagnostic, not a comparison: it found the cuDNN attention plans that made prefill on an
H100 ten times slower than it should be (BENCHMARKS.md, "On a CUDA GPU"). cProfile slows the
Python it watches, so read shares, not absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from collections.abc import Iterator
from contextlib import contextmanager

from torch.profiler import ProfilerActivity, profile

from rollserve import Engine
from rollserve.bench.offline import make_workload, run_engine
from rollserve.bench.timing import cpu_line
from rollserve.engine.scheduler import Scheduler
from rollserve.models.local_cache import ensure_tiny_model


@contextmanager
def profiled_steps(profiler: cProfile.Profile) -> Iterator[None]:
    """Profile every `Scheduler.step` run inside the block, on whichever thread runs it
    (cProfile watches only the thread that enables it)."""
    step = Scheduler.step

    def watched(self: Scheduler) -> None:
        profiler.enable()
        try:
            step(self)
        finally:
            profiler.disable()

    Scheduler.step = watched  # type: ignore[method-assign]
    try:
        yield
    finally:
        Scheduler.step = step  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.step_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=25, help="lines per table")
    parser.add_argument("--tp-size", type=int, default=1,
                        help="tensor-parallel ranks: rank 0's operators are profiled, its "
                             "all-reduces (c10d) among them")
    args = parser.parse_args(argv)
    model = ensure_tiny_model(args.preset)
    with Engine(str(model), dtype=args.dtype, device=args.device, tp_size=args.tp_size,
                max_total_tokens=args.num_prompts * 800, disable_radix_cache=True) as engine:
        vocab = engine.model_config.vocab_size
        run_engine(engine, make_workload(8, vocab, 1, (64, 512), (8, 8)))  # warm-up
        workload = make_workload(args.num_prompts, vocab, 0, (64, 512), (32, 256))
        python = cProfile.Profile()
        activities = [ProfilerActivity.CPU]
        if engine.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        ops = profile(activities=activities)
        # The torch profiler records the operators of the thread that starts it: the
        # engine's, where every step runs.
        engine._call(ops.__enter__)
        try:
            with profiled_steps(python):
                result = run_engine(engine, workload)
        finally:
            engine._call(lambda: ops.__exit__(None, None, None))
    print(f"{args.num_prompts} prompts on {args.device}: {result.seconds:.2f} s, "
          f"{result.output_throughput:.0f} out tok/s (profiled)")
    print(cpu_line())
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(text.getvalue())
    sort = "self_device_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    print(ops.key_averages().table(sort_by=sort, row_limit=args.rows,
                                   max_name_column_width=60))


if __name__ == "__main__":
    main()
