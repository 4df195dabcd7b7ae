"""Decode steps of a few rows: every decoder layer in one native call (kernels/decode_layers.c)
against the model's layer-by-layer forward, in the same engine, alternating.

    python -m rollserve.bench.decode_layers --preset qwen2.5-0.5b --rows 1 2 3

For each row count (up to the kernel's MAX_ROWS), `--rounds` times: that many lone requests
decode `--new-tokens` tokens together with the kernel, then again layer by layer (the
engine's thread switches the path between requests). Prints the median tokens/s of each and
`decode_layers_speedup_rows_N`: above 1 the kernel wins.
"""

from __future__ import annotations

import argparse
import statistics

from rollserve import Engine
from rollserve.bench.offline import decode_rate
from rollserve.bench.timing import cpu_line, print_ratio
from rollserve.kernels import decode_layers
from rollserve.models.local_cache import ensure_tiny_model


def paired_rates(engine: Engine, rows: int, rounds: int, new_tokens: int
                 ) -> tuple[list[float], list[float]]:
    """(kernel, layer-by-layer) tokens/s, `rounds` each, alternating."""
    kernel = engine.model.model.native_decode.kernel
    vocab = engine.model_config.vocab_size
    rates: dict[bool, list[float]] = {True: [], False: []}
    decode_rate(engine, vocab, 8, rows)  # warm-up
    for _ in range(rounds):
        for use in (True, False):
            engine._call(lambda use=use: engine.model.use_decode_layers(kernel if use else None))
            rates[use].append(decode_rate(engine, vocab, new_tokens, rows))
    engine._call(lambda: engine.model.use_decode_layers(kernel))
    return rates[True], rates[False]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.decode_layers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3],
                        choices=range(1, decode_layers.MAX_ROWS + 1))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    path = ensure_tiny_model(args.preset)
    print(cpu_line())
    with Engine(str(path), dtype=args.dtype, device="cpu") as engine:
        if engine.model.model.native_decode is None:
            raise SystemExit("the decode-layers kernel does not apply here (see the log)")
        print(f"model: {path} ({args.dtype}); {args.rounds} rounds of {args.new_tokens} tokens "
              f"a request")
        for rows in args.rows:
            fused, layered = paired_rates(engine, rows, args.rounds, args.new_tokens)
            print(f"rows {rows}: kernel {statistics.median(fused):.1f} tok/s "
                  f"({', '.join(f'{r:.1f}' for r in fused)}), layer by layer "
                  f"{statistics.median(layered):.1f} tok/s "
                  f"({', '.join(f'{r:.1f}' for r in layered)})")
            print_ratio(f"decode_layers_speedup_rows_{rows}",
                        statistics.median(fused) / statistics.median(layered))


if __name__ == "__main__":
    main()
