"""How far greedy text over a smaller KV cache stays with the float32 cache's.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kv_cache_agreement.py
        [--caches bfloat16,fp8,fp8+scales,fp8_e5m2,fp8_e5m2+scales] [--prompts 8] [--tokens 32]

The bundled model, float32 weights, the first --prompts chat questions of the parity tests, one
batch. For each cache (`+scales`: with --calculate-kv-scales) prints, per prompt, how many
tokens the text shares with the float32 cache's before they part, their mean, and where they
part, how far below float32's choice (in float32's logprobs, nats) the other token lies
("not in top 5" where it is not among float32's 5 best); then each layer's scales' range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' prompts

from headrace.offline import LLM
from headrace.wire.messages import SamplingParams
from tests.engine.test_greedy_vs_transformers import QUESTIONS, _conv, parting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--caches", default="bfloat16,fp8,fp8+scales,fp8_e5m2,fp8_e5m2+scales")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    convs = [_conv(q) for q in QUESTIONS[: args.prompts]]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    scored = SamplingParams(temperature=0.0, max_tokens=args.tokens, logprobs=5)
    memory = 64 << 20
    f32 = LLM(dtype="float32", kv_cache_memory=memory).chat(convs, scored)
    for name in args.caches.split(","):
        kv, _, scales = name.partition("+")
        llm = LLM(dtype="float32", kv_cache_memory=memory, kv_cache_dtype=kv,
                  calculate_kv_scales=bool(scales))  # fmt: skip
        shared, gaps = [], []
        for a, b in zip(f32, llm.chat(convs, greedy), strict=True):
            n, gap = parting(a.outputs[0], b.outputs[0])
            shared.append(n)
            if gap is not None:
                gaps.append("not in top 5" if gap == float("inf") else f"{gap:.2f}")
        got = [a.kv_scales for a in llm.engine.runner.model.attention]
        k, v = ([s[j] for s in got] for j in (0, 1))
        print(
            f"{name}: shared {shared}, mean {sum(shared) / len(shared):.1f}; "
            f"gaps {', '.join(gaps) or '-'}; scales k {min(k):.3g}-{max(k):.3g}, "
            f"v {min(v):.3g}-{max(v):.3g}",
            flush=True,
        )


if __name__ == "__main__":
    main()
