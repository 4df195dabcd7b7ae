"""Next-token sampling: the native CPU kernel, built for each instruction set this CPU runs,
against the sampler's PyTorch path, same logits.

    python -m rollserve.bench.sampling --batch 128 --vocab 151936

Times `sample()` on random bfloat16 logits for greedy rows and for temperature 1 (no top-k,
top-p or min-p: the batches the kernel serves), median of `--repeats` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rollserve.engine.request import Req
from rollserve.engine.sampler import sample
from rollserve.engine.sampling_params import SamplingParams
from rollserve.kernels.build import runnable_isas
from rollserve.kernels.sampling import NativeSampling


def median_ms(logits: torch.Tensor, temperature: float, native: NativeSampling | None,
              repeats: int) -> float:
    params = SamplingParams.from_dict({"temperature": temperature})
    reqs = [Req(f"r{i}", [0], params, None, lambda _req: None) for i in range(len(logits))]
    generator = torch.Generator().manual_seed(0)
    sample(logits, reqs, (), generator, native)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(logits, reqs, (), generator, native)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.sampling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if not runnable_isas():
        raise SystemExit("the native sampling kernel does not apply on this machine")
    natives = {isa: NativeSampling(isa) for isa in runnable_isas()}
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
    logits = logits.to(torch.bfloat16)
    print(f"{'rows':<16}{'native':<9}{'pytorch ms':>12}{'native ms':>11}{'speedup':>9}")
    for name, temperature in (("greedy", 0.0), ("temperature 1", 1.0)):
        peer = median_ms(logits, temperature, None, args.repeats)
        for isa, native in natives.items():
            ours = median_ms(logits, temperature, native, args.repeats)
            print(f"{name:<16}{isa:<9}{peer:>12.1f}{ours:>11.1f}{peer / ours:>9.2f}")


if __name__ == "__main__":
    main()
