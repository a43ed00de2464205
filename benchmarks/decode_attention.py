"""Time the decode attention kernel (kernels/decode_attention.c) over KV caches of each dtype
(float32, bf16, fp8 E4M3 and E5M2), at the bundled model's shape.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_attention.py [--backend avx2]
        [--seqs 64] [--context 192] [--rounds 7]
        [--dtypes float32,bfloat16,float8_e4m3fn,float8_e5m2]

SmolLM2-135M's attention (9 query heads over 3 KV heads of 64) for --seqs requests whose
contexts lie in (context - 64, context], blocks of 16 scattered through the cache. Each call
covers 30 layers' caches, one after the other as a decode step reads them, so the reads come
from memory, not from a cache that the last call warmed. The dtypes alternate round by round
(their order reversed every other round); prints the medians, the bytes a call reads and the
rate it reads them at.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from headrace.model.backend import backend_kernels

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", default="avx2", help="a kernel build: amx, avx512, avx2 or c")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtypes", default="float32,bfloat16,float8_e4m3fn,float8_e5m2")
    args = p.parse_args()
    kernels = backend_kernels(args.backend)
    gen = torch.Generator().manual_seed(0)
    width = -(-args.context // BLOCK)
    blocks = args.seqs * width
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, generator=gen)
    table = torch.randperm(blocks, generator=gen).view(args.seqs, width).contiguous()
    lens = args.context - torch.randint(0, min(64, args.context), (args.seqs,), generator=gen)
    shape = (2, blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = {
        dtype: [torch.randn(shape, generator=gen).to(dtype) for _ in range(LAYERS)]
        for dtype in (getattr(torch, name) for name in args.dtypes.split(","))
    }
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in caches}
    for r in range(args.rounds + 1):
        for dtype in caches if r % 2 else reversed(caches):
            t = time.perf_counter()
            for cache in caches[dtype]:
                kernels.paged_decode_attention(q, cache, table, lens, HEAD_DIM**-0.5)
            if r:  # the first round warms up
                times[dtype].append(time.perf_counter() - t)
    tokens = int(lens.sum())
    print(f"{args.backend}: {args.seqs} requests, {tokens} cached positions, {LAYERS} layers")
    for dtype, ts in times.items():
        took = statistics.median(ts)
        nbytes = 2 * tokens * KV_HEADS * HEAD_DIM * dtype.itemsize * LAYERS
        print(
            f"KV {str(dtype).removeprefix('torch.')}: median {1e3 * took:.1f} ms, "
            f"{nbytes / 2**20:.0f} MiB read at {nbytes / took / 1e9:.1f} GB/s"
        )


if __name__ == "__main__":
    main()
