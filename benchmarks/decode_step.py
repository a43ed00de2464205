"""Time one engine decode step at a fixed batch and context, optionally with an op profile.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_step.py [--seqs 64] [--context 192]
        [--dtype auto] [--kv-cache-dtype auto] [--block-size 16] [--profile]

Fills the engine with `--seqs` random prompts of `--context` tokens, prefills them, then reports
the median of `--steps` decode steps (every sequence decoding one token) as ms and tok/s. The
offline benchmark mixes prefill and decode; this isolates the step that dominates large batches,
which is what attention and kernel changes move.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from headrace import envs
from headrace.offline import LLM
from headrace.wire.messages import EngineCoreRequest, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8", "fp8_e5m2"]
    )
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    p.add_argument("--profile", action="store_true", help="also print torch's op profile")
    args = p.parse_args()
    envs.cap_libraries_for_cpu_backend()  # before the first matmul
    llm = LLM(
        dtype=args.dtype,
        max_num_seqs=args.seqs,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
        block_size=args.block_size,
        # only when asked: ab_commits.py runs this script against commits without the argument
        **({"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype != "auto" else {}),
    )
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    for i in range(args.seqs):
        ids = [rng.randrange(100, engine.runner.arch.vocab_size) for _ in range(args.context)]
        engine.add_request(
            EngineCoreRequest(request_id=str(i), prompt_token_ids=ids, sampling_params=params)
        )
    t = time.perf_counter()
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    print(f"prefill of {args.seqs} x {args.context} tokens: {time.perf_counter() - t:.2f} s")
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    print(
        f"decode step, {args.seqs} sequences at context ~{args.context}, "
        f"{torch.get_num_threads()} threads, dtype {engine.runner.dtype}, "
        f"KV {engine.runner.kv_dtype}: median {1e3 * step:.1f} ms = {args.seqs / step:.0f} tok/s"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
