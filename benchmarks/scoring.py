"""What scoring a prompt costs against reading it: prompt tokens per second, served.

    .venv/bin/python benchmarks/scoring.py [--prompts 32] [--input-len 256] [--users 8] [--rounds 3]

Scoring is what evaluation harnesses send: `echo` with `logprobs: 1` and `max_tokens: 0`, the
prompt's own logprobs. It needs the LM head at every prompt position, not only the last, and
reads nothing from the prefix cache. Reading is the same prompts with `max_tokens: 1`. Every
request has its own random-word prompt (no prefix-cache hits on either side); the two alternate
round by round against one `headrace serve` (default flags), and the medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from tests.e2e.server import ServerProcess

WORDS = ["river", "stone", "light", "quiet", "market", "paper", "window", "garden", "engine"]


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


async def run(url: str, texts: list[str], users: int, scoring: bool) -> tuple[float, int]:
    """Seconds for every prompt, and the prompt tokens the server counted."""
    body = {"max_tokens": 0, "echo": True, "logprobs": 1} if scoring else {"max_tokens": 1}
    gate = asyncio.Semaphore(users)
    tokens = 0

    async def one(client: httpx.AsyncClient, text: str) -> None:
        nonlocal tokens
        async with gate:
            r = await client.post("/v1/completions", json={"prompt": text, **body})
            r.raise_for_status()
            tokens += r.json()["usage"]["prompt_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, t) for t in texts))
        return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256, help="words a prompt (~4 tokens each)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    srv = ServerProcess().wait_ready()
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        for r in range(args.rounds):
            for scoring in (r % 2 == 0, r % 2 != 0):  # alternate which goes first
                texts = [prompt(rng, args.input_len) for _ in range(args.prompts)]
                seconds, tokens = asyncio.run(run(srv.url, texts, args.users, scoring))
                rates[scoring].append(tokens / seconds)
                kind = "scoring" if scoring else "reading"
                print(f"round {r} {kind}: {tokens} prompt tokens in {seconds:.2f} s", flush=True)
    finally:
        srv.stop()
    read, score = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"reading {read:.0f} prompt tok/s, scoring {score:.0f} (x{score / read:.2f}), medians")


if __name__ == "__main__":
    main()
