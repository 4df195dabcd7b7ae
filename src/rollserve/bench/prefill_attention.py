"""Prefill (extend) attention of one sequence: the native kernel against SDPA.

    python -m rollserve.bench.prefill_attention --lengths 96 288 512 --dtype bfloat16

Qwen2.5-0.5B's attention shapes (14 query heads, 2 KV heads, head_dim 64), causal, one layer, in
bfloat16 or float32; the kernel is the build the engine would pick here (ROLLSERVE_CPU_ISA=avx2
forces the AVX2 one). Three timings per length, each the median of --repeats calls with torch's
thread count: SDPA on contiguous K/V (a bare call), the engine's SDPA path (paged_attention without
the kernel: K/V written to the pool, gathered back by slot, padded to 32 rows) and the
kernel's path (paged_attention with it: K/V written to the pool and read there in place).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rollserve.bench.timing import cpu_line, median_seconds
from rollserve.kernels.prefill_attention import PrefillAttention, make_prefill_attention
from rollserve.models.attention import AttentionBatch, ExtendSpan, paged_attention, write_kv

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64
SCALE = HEAD_DIM**-0.5


def measure(q_len: int, prefix: int, kernel: PrefillAttention, repeats: int) -> None:
    """Times one length and prints its row."""
    gen = torch.Generator().manual_seed(q_len)
    kv_len, dtype = prefix + q_len, kernel.dtype
    pool = torch.randn(2, 1, KV_HEADS, kv_len + 1, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(q_len, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k, v = pool[0, 0, :, -q_len:].transpose(0, 1), pool[1, 0, :, -q_len:].transpose(0, 1)
    slots = torch.arange(1, kv_len + 1)  # slot 0 stays free, as in the engine's pool
    mask = None
    if prefix:
        mask = torch.arange(kv_len)[None] <= torch.arange(prefix, kv_len)[:, None]

    def attend_with(extend_kernel: PrefillAttention | None) -> Callable[[], torch.Tensor]:
        batch = AttentionBatch(
            torch.arange(prefix, kv_len), slots[prefix:], 0, None, None, None,
            [ExtendSpan(0, q_len, slots, mask)], pool[0], pool[1], extend_kernel=extend_kernel,
        )
        return lambda: (write_kv(0, k, v, batch), paged_attention(0, q, batch, SCALE))

    queries, keys, values = q.transpose(0, 1)[None], pool[0, :, :, 1:], pool[1, :, :, 1:]
    bare = median_seconds(lambda: F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=SCALE,
        enable_gqa=True), repeats)
    path = median_seconds(attend_with(None), repeats)
    ours = median_seconds(attend_with(kernel), repeats)
    flops = 4 * HEADS * HEAD_DIM * q_len * (prefix + (q_len + 1) / 2)
    print(f"{q_len:>6}{bare * 1e3:>9.3f}{path * 1e3:>9.3f}{ours * 1e3:>11.3f}"
          f"{flops / ours / 1e9:>9.0f}{bare / ours:>9.2f}{path / ours:>9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollserve.bench.prefill_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[96, 288, 512])
    parser.add_argument("--prefix", type=int, default=0, help="cached tokens before them")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    kernel = make_prefill_attention(torch.device("cpu"), dtype, HEAD_DIM, HEADS // KV_HEADS)
    if kernel is None:
        raise SystemExit(f"the prefill-attention kernel does not apply to {args.dtype} here")
    print(cpu_line())
    print(f"{torch.get_num_threads()} threads, {HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM},"
          f" {args.dtype} ({kernel.isa} build), causal after {args.prefix} cached tokens")
    print(f"{'q_len':>6}{'sdpa ms':>9}{'path ms':>9}{'kernel ms':>11}{'GFLOP/s':>9}"
          f"{'vs sdpa':>9}{'vs path':>9}")
    for q_len in args.lengths:
        measure(q_len, args.prefix, kernel, args.repeats)


if __name__ == "__main__":
    main()
