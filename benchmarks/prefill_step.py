"""Time prefill steps (prompt chunks only), with the AMX attention kernel and without it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/prefill_step.py [--shapes 16x128,1x2048]
        [--rounds 8]

Each shape NxL is N random prompts of L tokens, prefilled in one step (max_num_batched_tokens is
raised to fit) with max_tokens=1. The runs alternate between prompt-chunk attention on AMX tiles
(paged_prefill_attention_amx, the default with a bf16 cache on an AMX CPU) and the float32-FMA
kernel (as the avx512 backend runs it), in one process so both see the same machine;
the first round is a warm-up. Prints the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from headrace.offline import LLM
from headrace.wire.messages import EngineCoreRequest, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="16x128,1x1024,1x2048", help="prompts x tokens, commas")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    longest = max(n * length for n, length in shapes)
    llm = LLM(
        max_num_seqs=max(n for n, _ in shapes),
        max_num_batched_tokens=longest,
        max_model_len=max(length for _, length in shapes) + 1,
        enable_prefix_caching=False,
    )
    engine, kernels = llm.engine, llm.engine.runner.backend.kernels
    if kernels is None or not kernels.amx_attention:
        raise SystemExit("no AMX prompt-chunk attention here (no AMX, or switched off)")
    rng = random.Random(0)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    ids = iter(range(1 << 62))

    def prefill(n: int, length: int) -> float:
        for _ in range(n):
            prompt = [rng.randrange(100, vocab) for _ in range(length)]
            engine.add_request(
                EngineCoreRequest(
                    request_id=str(next(ids)), prompt_token_ids=prompt, sampling_params=params
                )
            )
        t = time.perf_counter()
        while engine.scheduler.waiting or engine.scheduler.running:
            engine.step()
        return time.perf_counter() - t

    times: dict[tuple[bool, tuple[int, ...]], list[float]] = {}
    for r in range(args.rounds + 1):
        for amx in (True, False) if r % 2 else (False, True):
            kernels.amx_attention = amx
            for n, length in shapes:
                took = prefill(n, length)
                if r:
                    times.setdefault((amx, (n, length)), []).append(took)
    kernels.amx_attention = True
    for n, length in shapes:
        on = statistics.median(times[(True, (n, length))])
        off = statistics.median(times[(False, (n, length))])
        print(
            f"{n} x {length} tokens: float32-FMA attention {1e3 * off:.0f} ms, "
            f"AMX {1e3 * on:.0f} ms ({on / off:.2f})"
        )


if __name__ == "__main__":
    main()
