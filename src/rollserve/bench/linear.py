"""A decode step's matmuls: the AMX few-row kernel against oneDNN (prepacked), same weights.

    python -m rollserve.bench.linear --rows 1 8 16 32 64

Qwen2.5-0.5B's linears in bf16: 24 layers of q/k/v/o and gate/up/down plus the tied lm_head,
988 MB in all, so every pass reads the weights from memory as a real forward does. For each
row count the two paths alternate for --repeats passes; prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rollserve.kernels.amx_linear import AmxLinear, make_amx_linear
from rollserve.models.linear import linear, pack

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, KV_SIZE = 896, 4864, 151936, 24, 128
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV_SIZE, HIDDEN), (KV_SIZE, HIDDEN), (HIDDEN, HIDDEN),
                (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]

Weights = list[tuple[torch.Tensor, torch.Tensor | None]]


def model_weights(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Weights:
    """The weights, each with its oneDNN-packed copy where the engine would pack it."""
    generator = torch.Generator().manual_seed(seed)
    shapes = LAYER_SHAPES * LAYERS + [(VOCAB, HIDDEN)]
    weights = [(torch.randn(n, k, generator=generator) * 0.02).to(dtype) for n, k in shapes]
    return [(w, pack(w)) for w in weights]


def forward_seconds(weights: Weights, rows: int, amx: AmxLinear | None = None) -> float:
    dtype = weights[0][0].dtype
    inputs = {k: torch.randn(rows, k).to(dtype) for k in (HIDDEN, INTERMEDIATE)}
    start = time.perf_counter()
    for weight, packed in weights:
        linear(inputs[weight.shape[1]], weight, packed, amx=amx)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.linear",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    amx = make_amx_linear(torch.device("cpu"), torch.bfloat16)
    if amx is None:
        raise SystemExit("the AMX linear kernel does not apply on this machine")
    weights = model_weights()
    print(f"{'rows':>5}{'oneDNN ms':>11}{'AMX ms':>9}{'speedup':>9}")
    with torch.inference_mode():
        for rows in args.rows:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats + 1):  # the first round warms up
                for use_amx in (False, True):
                    times[use_amx].append(forward_seconds(weights, rows, amx if use_amx else None))
            onednn, ours = (statistics.median(times[k][1:]) * 1e3 for k in (False, True))
            note = "" if amx.serves(torch.empty(rows, HIDDEN, dtype=torch.bfloat16),
                                    weights[0][0]) else "  (beyond MAX_ROWS: both oneDNN)"
            print(f"{rows:>5}{onednn:>11.1f}{ours:>9.1f}{onednn / ours:>9.2f}{note}")


if __name__ == "__main__":
    main()
