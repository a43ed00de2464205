"""Time the float32 linears that read GGUF blocks (kernels/q4_linear.c) against torch's float32
matmul over the dequantized weight, at the bundled model's shapes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/block_linears.py [--rows 1,8,16,64,128]
        [--backend avx2] [--rounds 15] [--torch float32|bf16]

`--torch bf16` compares against what a bf16 model's layers use past the blocks' row limit on a
CPU with bf16 support: oneDNN's packed bf16 linear (layers.PackedLinear), x converted to bf16
and the output back to float32 inside the timed call, as _BlockLinear.forward does.

Shapes: SmolLM2-135M's decoder linears (qkv 960x576, gate_up 3072x576, down 576x1536) as Q4
blocks with fp16 scales, and its LM head (49152x576) as Q8_0. For each shape and row count the
two calls alternate in one process (torch's threads and the kernels' are the same pool), after
two warm-up calls each; prints the medians, GFLOP/s, and the largest difference between the two
outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from headrace.model.backend import backend_kernels
from headrace.model.layers import PackedLinear

Q4_SHAPES = [(960, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def q4_weight(kernels, n: int, k: int, gen: torch.Generator):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.02).half().float()
    offset = -8 * scale  # Q4_0
    w = q.float().reshape(n, k // 32, 32) * scale[..., None] + offset[..., None]
    packed = kernels.q4_pack(scale, offset, q)
    return (lambda x: kernels.q4_linear(x, packed, None)), w.reshape(n, k)


def q8_weight(kernels, n: int, k: int, gen: torch.Generator):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
    w = q.float().reshape(n, k // 32, 32) * scale[..., None]
    return (lambda x: kernels.q8_linear(x, q, scale, None)), w.reshape(n, k)


def torch_linear(w: torch.Tensor, dtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's linear over the dequantized weight: float32, or oneDNN's packed bf16."""
    if dtype == "float32":
        return lambda x: F.linear(x, w)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    packed = PackedLinear(linear)
    return lambda x: packed(x.bfloat16()).float()


def alternate(
    ours: Callable[[torch.Tensor], torch.Tensor],
    theirs: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    rounds: int,
) -> tuple[float, float]:
    """Median seconds of ours(x) and of theirs(x), called in turn."""
    calls = (lambda: ours(x), lambda: theirs(x))
    for _ in range(2):
        for f in calls:
            f()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for f, out in zip(calls, times, strict=True):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="1,8,9,16,32,64,128,256")
    p.add_argument("--backend", default="avx2", help="kernel build: avx512, avx2 or c")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--torch", default="float32", choices=("float32", "bf16"))
    args = p.parse_args()
    kernels = backend_kernels(args.backend)
    gen = torch.Generator().manual_seed(0)
    shapes = [("q4", n, k) for n, k in Q4_SHAPES] + [("q8", *LM_HEAD)]
    print(f"{args.backend} kernels, {torch.get_num_threads()} threads; medians of {args.rounds}")
    print(f"| weight | rows | blocks | torch {args.torch} | blocks GFLOP/s | torch GFLOP/s "
          "| max diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind, n, k in shapes:
        ours, w = (q4_weight if kind == "q4" else q8_weight)(kernels, n, k, gen)
        reference = torch_linear(w, args.torch)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=gen)
            diff = float((ours(x) - reference(x)).abs().max())
            mine, theirs = alternate(ours, reference, x, args.rounds)
            flop = 2 * rows * n * k / 1e9
            print(
                f"| {kind} {n}x{k} | {rows} | {1e3 * mine:.2f} ms | {1e3 * theirs:.2f} ms "
                f"| {flop / mine:.0f} | {flop / theirs:.0f} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
