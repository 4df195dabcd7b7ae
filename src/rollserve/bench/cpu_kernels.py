"""Native-kernel microbenchmarks, one subcommand each, against the paths the kernels replace.

    python -m rollserve.bench.cpu_kernels sampling --batch 128 --vocab 151936
    python -m rollserve.bench.cpu_kernels linear --rows 1 8 16 32 64
    python -m rollserve.bench.cpu_kernels dtypes --rows 1 16 64
    python -m rollserve.bench.cpu_kernels float32 --rows 1 3 16 64 512

sampling: `sample()` on random bf16 logits, greedy and at temperature 1 (no top-k, top-p or
min-p: the batches the kernel serves), the native kernel built for each instruction set this
CPU runs against the sampler's PyTorch path; medians of --repeats calls.

linear: a decode step's matmuls, the AMX few-row kernel against oneDNN (prepacked), on
Qwen2.5-0.5B's linears in bf16: 24 layers of q/k/v/o and gate/up/down plus the tied lm_head,
988 MB in all, so every pass reads the weights from memory as a real forward does. The two
paths alternate for --repeats passes; prints the medians and their ratio.

dtypes: the same linears in float32, bf16 and fp16 as the engine runs them (oneDNN,
prepacked where it packs that dtype), alternating; prints each dtype's time over float32's.
The measurement behind `dtype="auto"` computing 16-bit checkpoints in float32 on CPUs that
only emulate them (`models/loader.py`, `auto_dtype`).

float32: the same linears in float32, the engine's path (oneDNN, prepacked from two rows,
models/linear.py, `linear`) against F.linear (the BLAS PyTorch was built with),
alternating; prints both and their ratio.

Decode and prefill attention have scripts of their own (bench.decode_attention,
bench.prefill_attention).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from rollserve.bench.timing import (
    Column,
    cpu_line,
    interleaved_median_seconds,
    median_seconds,
    print_table,
)
from rollserve.engine.request import Req
from rollserve.engine.sampler import sample
from rollserve.engine.sampling_params import SamplingParams
from rollserve.kernels.amx_linear import AmxLinear, make_amx_linear
from rollserve.kernels.build import runnable_isas
from rollserve.kernels.sampling import NativeSampling
from rollserve.models.linear import linear, pack
from rollserve.models.loader import cpu_computes_natively
from rollserve.utils.dtypes import dtype_name

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, KV_SIZE = 896, 4864, 151936, 24, 128
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV_SIZE, HIDDEN), (KV_SIZE, HIDDEN), (HIDDEN, HIDDEN),
                (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Weights = list[tuple[torch.Tensor, torch.Tensor | None]]


def model_weights(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Weights:
    """The weights, each with its oneDNN-packed copy where the engine would pack it."""
    generator = torch.Generator().manual_seed(seed)
    shapes = LAYER_SHAPES * LAYERS + [(VOCAB, HIDDEN)]
    weights = [(torch.randn(n, k, generator=generator) * 0.02).to(dtype) for n, k in shapes]
    return [(w, pack(w)) for w in weights]


def forward_linears(weights: Weights, rows: int, amx: AmxLinear | None = None,
                    blas: bool = False) -> Callable[[], None]:
    """One pass of `rows` rows through every linear, as a call to time (inputs made here,
    outside the timing): as the engine runs them, or with `blas` through F.linear."""
    dtype = weights[0][0].dtype
    inputs = {k: torch.randn(rows, k).to(dtype) for k in (HIDDEN, INTERMEDIATE)}

    def forward() -> None:
        for weight, packed in weights:
            x = inputs[weight.shape[1]]
            if blas:
                F.linear(x, weight)
            else:
                linear(x, weight, packed, amx=amx)

    return forward


def run_sampling(args: argparse.Namespace) -> None:
    if not runnable_isas():
        raise SystemExit("the native sampling kernel does not apply on this machine")
    natives = {isa: NativeSampling(isa) for isa in runnable_isas()}
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
    columns = [Column("rows", 16, align="<"), Column("native", 9, align="<"),
               Column("pytorch ms", 12, ".1f"), Column("native ms", 11, ".1f"),
               Column("speedup", 9, ".2f")]
    print(cpu_line())
    print_table(columns, _sampling_rows(logits.to(torch.bfloat16), natives, args.repeats))


def _sampling_rows(logits: torch.Tensor, natives: dict[str, NativeSampling],
                   repeats: int) -> Iterator[tuple[str, str, float, float, float]]:
    for name, temperature in (("greedy", 0.0), ("temperature 1", 1.0)):
        peer = median_seconds(_sample_call(logits, temperature, None), repeats) * 1e3
        for isa, native in natives.items():
            ours = median_seconds(_sample_call(logits, temperature, native), repeats) * 1e3
            yield name, isa, peer, ours, peer / ours


def _sample_call(logits: torch.Tensor, temperature: float,
                 native: NativeSampling | None) -> Callable[[], object]:
    params = SamplingParams.from_dict({"temperature": temperature})
    reqs = [Req(f"r{i}", [0], params, None, lambda _req: None) for i in range(len(logits))]
    generator = torch.Generator().manual_seed(0)
    return lambda: sample(logits, reqs, (), generator, native)


def run_linear(args: argparse.Namespace) -> None:
    amx = make_amx_linear(torch.device("cpu"), torch.bfloat16)
    if amx is None:
        raise SystemExit("the AMX linear kernel does not apply on this machine")
    columns = [Column("rows", 5), Column("oneDNN ms", 11, ".1f"), Column("AMX ms", 9, ".1f"),
               Column("speedup", 9, ".2f"), Column("", 0, align="<")]
    print(cpu_line())
    with torch.inference_mode():
        print_table(columns, _linear_rows(model_weights(), amx, args.rows, args.repeats))


def _linear_rows(weights: Weights, amx: AmxLinear, row_counts: list[int],
                 repeats: int) -> Iterator[tuple[int, float, float, float, str]]:
    for rows in row_counts:
        ms = interleaved_median_seconds({"onednn": forward_linears(weights, rows),
                                         "amx": forward_linears(weights, rows, amx)}, repeats)
        onednn, ours = ms["onednn"] * 1e3, ms["amx"] * 1e3
        served = amx.serves(torch.empty(rows, HIDDEN, dtype=torch.bfloat16), weights[0][0])
        note = "" if served else "  (beyond MAX_ROWS: both oneDNN)"
        yield rows, onednn, ours, onednn / ours, note


def run_dtypes(args: argparse.Namespace) -> None:
    weights = {dtype: model_weights(dtype=dtype) for dtype in DTYPES}
    names = [dtype_name(dtype) for dtype in DTYPES]
    print(cpu_line())
    print("native on this CPU: " + ", ".join(
        f"{name} {'yes' if cpu_computes_natively(dtype) else 'no'}"
        for name, dtype in zip(names, DTYPES, strict=True)))
    columns = [Column("rows", 5), *(Column(f"{name} ms", 14, ".1f") for name in names),
               *(Column(f"{name}/fp32", 14, ".2f") for name in names[1:])]
    with torch.inference_mode():
        print_table(columns, _dtype_rows(weights, args.rows, args.repeats))


def _dtype_rows(weights: dict[torch.dtype, Weights], row_counts: list[int],
                repeats: int) -> Iterator[list[float]]:
    for rows in row_counts:
        medians = interleaved_median_seconds(
            {dtype: forward_linears(weights[dtype], rows) for dtype in DTYPES}, repeats)
        ms = [medians[dtype] * 1e3 for dtype in DTYPES]
        yield [rows, *ms, *(m / ms[0] for m in ms[1:])]


def run_float32(args: argparse.Namespace) -> None:
    weights = model_weights(dtype=torch.float32)
    columns = [Column("rows", 5), Column("F.linear ms", 13, ".1f"),
               Column("oneDNN ms", 11, ".1f"), Column("speedup", 9, ".2f")]
    print(cpu_line())
    with torch.inference_mode():
        print_table(columns, _float32_rows(weights, args.rows, args.repeats))


def _float32_rows(weights: Weights, row_counts: list[int],
                  repeats: int) -> Iterator[tuple[int, float, float, float]]:
    for rows in row_counts:
        ms = interleaved_median_seconds({"blas": forward_linears(weights, rows, blas=True),
                                         "onednn": forward_linears(weights, rows)}, repeats)
        yield rows, ms["blas"] * 1e3, ms["onednn"] * 1e3, ms["blas"] / ms["onednn"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.cpu_kernels",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="KERNEL")
    sampling = commands.add_parser("sampling", help="native sampling vs the PyTorch path")
    sampling.add_argument("--batch", type=int, default=128)
    sampling.add_argument("--vocab", type=int, default=151936)
    sampling.add_argument("--repeats", type=int, default=9)
    sampling.set_defaults(run=run_sampling)
    amx = commands.add_parser("linear", help="AMX few-row linears vs oneDNN")
    amx.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    amx.add_argument("--repeats", type=int, default=7)
    amx.set_defaults(run=run_linear)
    dtypes = commands.add_parser("dtypes", help="the linears in float32, bf16 and fp16")
    dtypes.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    dtypes.add_argument("--repeats", type=int, default=3)
    dtypes.set_defaults(run=run_dtypes)
    float32 = commands.add_parser("float32", help="float32 linears: oneDNN vs F.linear")
    float32.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16, 64, 512])
    float32.add_argument("--repeats", type=int, default=3)
    float32.set_defaults(run=run_float32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
