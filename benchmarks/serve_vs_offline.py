"""What the frontend and the process boundary cost: served vs offline throughput, one invocation.

    .venv/bin/python benchmarks/serve_vs_offline.py [--users 1,16,64]

Workload (the same for both sides): --input-len-token random-word prompts (exact length
with the model's tokenizer), --output-len tokens each, ignore_eos, greedy. Offline: `LLM.generate`
with max_num_seqs = users. Served: `headrace serve` (default flags) as a subprocess and
`headrace bench serve` logic in this process, streaming, max concurrency = users. Both count
output tokens over the whole run (prefill included). Offline runs first, then the server, so the
two never compete for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server's engine runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from headrace.bench.dataset import RemoteTokenizer, random_prompts
from headrace.bench.serve import add_bench_serve_args, run_benchmark
from headrace.offline import LLM
from headrace.wire.messages import SamplingParams
from tests.e2e.server import ServerProcess


def num_prompts_for(users: int) -> int:
    return max(4, 2 * users)


async def make_prompts(n: int, input_len: int, output_len: int) -> list[str]:
    async with httpx.AsyncClient() as client:
        tok = RemoteTokenizer(client, "", "", local_path=None)
        tok.local = LLM_TOKENIZER
        prompts = await random_prompts(tok, n, input_len, output_len, 0.0, seed=0)
    return [p.text for p in prompts]


def offline(users: list[int], texts: list[str], output_len: int) -> dict[int, float]:
    out = {}
    for u in users:
        llm = LLM(max_num_seqs=u)
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate(texts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        batch = texts[: num_prompts_for(u)]
        t0 = time.perf_counter()
        res = llm.generate(batch, params)
        elapsed = time.perf_counter() - t0
        out[u] = sum(len(r.outputs[0].token_ids) for r in res) / elapsed
        print(f"offline  users={u:<3} {out[u]:8.1f} output tok/s", flush=True)
        del llm
        gc.collect()
    return out


def served(users: list[int], args: argparse.Namespace) -> dict[int, float]:
    srv = ServerProcess("--disable-log-requests").wait_ready()
    out = {}
    try:
        for u in users:
            parser = argparse.ArgumentParser()
            add_bench_serve_args(parser)
            bench_args = parser.parse_args(
                [
                    "--base-url", srv.url, "--num-prompts", str(num_prompts_for(u)),
                    "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len),
                    "--max-concurrency", str(u), "--num-warmups", "2", "--disable-tqdm",
                ]
            )  # fmt: skip
            result = asyncio.run(run_benchmark(bench_args))
            assert result.failed == 0, result.errors
            out[u] = result.output_throughput
            print(
                f"served   users={u:<3} {out[u]:8.1f} output tok/s "
                f"(TTFT median {result.aggregates['median_ttft_ms']:.0f} ms, "
                f"TPOT median {result.aggregates['median_tpot_ms']:.1f} ms)",
                flush=True,
            )
    finally:
        srv.stop()
    return out


def main() -> None:
    global LLM_TOKENIZER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", default="1,16,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args()
    users = [int(u) for u in args.users.split(",")]
    from headrace.model.loader import load_tokenizer, resolve_model_path

    LLM_TOKENIZER = load_tokenizer(resolve_model_path(None))
    texts = asyncio.run(make_prompts(num_prompts_for(max(users)), args.input_len, args.output_len))
    off = offline(users, texts, args.output_len)
    srv = served(users, args)
    print("\n| users | offline tok/s | served tok/s | served / offline |")
    print("|---|---|---|---|")
    for u in users:
        print(f"| {u} | {off[u]:.1f} | {srv[u]:.1f} | {srv[u] / off[u]:.2f} |")


LLM_TOKENIZER = None

if __name__ == "__main__":
    main()
