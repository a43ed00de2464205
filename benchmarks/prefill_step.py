"""Time prefill steps (prompt chunks only) for each KV-cache dtype, and on AMX with the AMX
prompt-chunk attention and without it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/prefill_step.py [--shapes 16x128,1x2048]
        [--kv-cache-dtype auto,bfloat16,fp8] [--dtype auto] [--rounds 8]

Each shape NxL is N random prompts of L tokens, prefilled in one step (max_num_batched_tokens is
raised to fit) with max_tokens=1. One engine per --kv-cache-dtype, all in one process, the runs
alternating between them round by round so all see the same machine; the first round is a
warm-up. Where the backend runs prompt-chunk attention on AMX tiles (a bf16 cache on an AMX CPU),
that engine also runs with the float32-FMA kernel (as the avx512 backend runs it). Prints the
median step time of each variant and its ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from headrace import envs
from headrace.offline import LLM
from headrace.wire.messages import EngineCoreRequest, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="16x128,1x1024,1x2048", help="prompts x tokens, commas")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, bfloat16, fp8, fp8_e5m2: commas")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    envs.cap_libraries_for_cpu_backend()  # before the first matmul
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rng = random.Random(0)
    ids = iter(range(1 << 62))
    # (name, engine, whether prompt attention may take AMX tiles)
    variants: list[tuple[str, LLM, bool]] = []
    for kv in args.kv_cache_dtype.split(","):
        llm = LLM(
            dtype=args.dtype,
            max_num_seqs=max(n for n, _ in shapes),
            max_num_batched_tokens=max(n * length for n, length in shapes),
            max_model_len=max(length for _, length in shapes) + 1,
            enable_prefix_caching=False,
            **({"kv_cache_dtype": kv} if kv != "auto" else {}),
        )
        runner = llm.engine.runner
        name = f"KV {str(runner.kv_dtype).removeprefix('torch.')}"
        kernels = runner.backend.kernels
        if kernels is not None and kernels.prefill_on_amx(runner.kv_dtype, runner.arch.head_dim):
            variants += [
                (f"{name}, AMX attention", llm, True),
                (f"{name}, FMA attention", llm, False),
            ]
        else:
            variants.append((name, llm, True))

    def prefill(llm: LLM, amx: bool, n: int, length: int) -> float:
        engine = llm.engine
        kernels = engine.runner.backend.kernels
        if kernels is not None and not amx:  # this instance's answer, over the class's method
            off: Callable[..., bool] = lambda *_: False  # noqa: E731
            kernels.prefill_on_amx = off  # type: ignore[method-assign]
        vocab = engine.runner.arch.vocab_size
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        for _ in range(n):
            prompt = [rng.randrange(100, vocab) for _ in range(length)]
            engine.add_request(
                EngineCoreRequest(
                    request_id=str(next(ids)), prompt_token_ids=prompt, sampling_params=params
                )
            )
        try:
            t = time.perf_counter()
            while engine.scheduler.waiting or engine.scheduler.running:
                engine.step()
            return time.perf_counter() - t
        finally:
            if kernels is not None and "prefill_on_amx" in vars(kernels):
                del kernels.prefill_on_amx

    times: dict[tuple[int, tuple[int, ...]], list[float]] = {}
    for r in range(args.rounds + 1):
        order = range(len(variants)) if r % 2 else reversed(range(len(variants)))
        for v in order:
            _, llm, amx = variants[v]
            for n, length in shapes:
                took = prefill(llm, amx, n, length)
                if r:
                    times.setdefault((v, (n, length)), []).append(took)
    for n, length in shapes:
        first = statistics.median(times[(0, (n, length))])
        cells = []
        for v, (name, _, _) in enumerate(variants):
            took = statistics.median(times[(v, (n, length))])
            cells.append(f"{name} {1e3 * took:.0f} ms ({took / first:.2f})")
        print(f"{n} x {length} tokens: " + ", ".join(cells))


if __name__ == "__main__":
    main()
