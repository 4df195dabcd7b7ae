"""Decode attention over a 24-layer KV pool: the native kernel, built for each instruction set
this CPU runs, against the PyTorch path.

    python -m rollserve.bench.decode_attention --sequences 128 --kv-len 558

Qwen2.5-0.5B's attention shapes (14 query heads, 2 KV heads, head_dim 64, bf16). Slots are
laid out as the engine allocates them: each prompt contiguous, then the decode tokens of all
sequences interleaved. A 64 MiB sweep between layers evicts the caches, as a layer's weights
do in the real forward. Prints the median over --repeats passes of all layers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rollserve.kernels.build import runnable_isas
from rollserve.kernels.decode_attention import DecodeAttention
from rollserve.models.attention import AttentionBatch, paged_attention, write_kv

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 24, 14, 2, 64


def engine_like_slots(sequences: int, kv_len: int, prompt_share: float = 0.7) -> torch.Tensor:
    prompt = int(kv_len * prompt_share)
    prompts = torch.arange(sequences * prompt).view(sequences, prompt)
    decoded = sequences * prompt + torch.arange(sequences * (kv_len - prompt))
    return torch.cat([prompts, decoded.view(kv_len - prompt, sequences).t()], 1).contiguous()


def median_seconds(attend: Callable[[int], None], repeats: int) -> float:
    sweep = torch.empty(64 << 20, dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        total = 0.0
        for layer in range(LAYERS):
            sweep.add_(1)
            start = time.perf_counter()
            attend(layer)
            total += time.perf_counter() - start
        times.append(total)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.decode_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--kv-len", type=int, default=558)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16
    if not runnable_isas():
        raise SystemExit("the decode-attention kernel does not apply on this machine")
    kernels = {f"native {isa}": DecodeAttention(HEAD_DIM, HEADS // KV_HEADS, dtype, isa)
               for isa in runnable_isas()}
    n, kv_len = args.sequences, args.kv_len
    gen = torch.Generator().manual_seed(0)
    shape = (LAYERS, KV_HEADS, n * kv_len + 1, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots = engine_like_slots(n, kv_len)
    # Each step writes the new token's K/V to its last slot; the cached rows come before it.
    q = torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_new = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    lens = torch.full((n,), kv_len)
    padding = torch.zeros(n, 1, kv_len, dtype=torch.bool)

    def attend_with(decode_kernel: DecodeAttention | None) -> Callable[[int], None]:
        batch = AttentionBatch(lens - 1, slots[:, -1].clone(), n, slots, lens,
                               None if decode_kernel else padding, [], k_cache, v_cache,
                               decode_kernel)
        return lambda layer: (write_kv(layer, k_new, k_new, batch),
                              paged_attention(layer, q, batch, HEAD_DIM**-0.5))

    peer = median_seconds(attend_with(None), args.repeats)
    gigabytes = n * kv_len * KV_HEADS * HEAD_DIM * 2 * 2 * LAYERS / 1e9
    print(f"{n} sequences x {kv_len} cached tokens, {LAYERS} layers, {gigabytes:.2f} GB of K/V")
    print(f"{'path':<16}{'ms':>9}{'GB/s':>8}{'speedup':>9}")
    print(f"{'pytorch':<16}{peer * 1e3:>9.1f}{gigabytes / peer:>8.1f}{1:>9.2f}")
    for name, kernel in kernels.items():
        ours = median_seconds(attend_with(kernel), args.repeats)
        print(f"{name:<16}{ours * 1e3:>9.1f}{gigabytes / ours:>8.1f}{peer / ours:>9.2f}")


if __name__ == "__main__":
    main()
