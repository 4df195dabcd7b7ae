"""A forward's linears in each floating dtype on this CPU: the measurement behind
`dtype="auto"` computing 16-bit checkpoints in float32 on CPUs that only emulate them
(`models/loader.py`, `auto_dtype`).

    python -m rollserve.bench.dtype_matmul --rows 1 16 64

bench.linear's weights (Qwen2.5-0.5B's linears and tied lm_head) as the engine runs them:
oneDNN, prepacked where it packs that dtype. For each row count the dtypes alternate for
--repeats passes; prints the medians and each dtype's time over float32's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from rollserve.bench.linear import forward_seconds, model_weights
from rollserve.models.loader import cpu_computes_natively
from rollserve.utils.dtypes import dtype_name

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.dtype_matmul",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    weights = {dtype: model_weights(dtype=dtype) for dtype in DTYPES}
    names = [dtype_name(dtype) for dtype in DTYPES]
    print("native on this CPU: " + ", ".join(
        f"{name} {'yes' if cpu_computes_natively(dtype) else 'no'}"
        for name, dtype in zip(names, DTYPES, strict=True)))
    print(f"{'rows':>5}" + "".join(f"{name + ' ms':>14}" for name in names)
          + "".join(f"{name + '/fp32':>14}" for name in names[1:]))
    with torch.inference_mode():
        for rows in args.rows:
            times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in DTYPES}
            for _ in range(args.repeats + 1):  # the first round warms up
                for dtype in DTYPES:
                    times[dtype].append(forward_seconds(weights[dtype], rows))
            ms = [statistics.median(times[dtype][1:]) * 1e3 for dtype in DTYPES]
            print(f"{rows:>5}" + "".join(f"{m:>14.1f}" for m in ms)
                  + "".join(f"{m / ms[0]:>14.2f}" for m in ms[1:]))


if __name__ == "__main__":
    main()
