"""The event loop under a flood of giant prompts: does `GET /health` stay fast?

    python benchmarks/flood.py [--requests 60] [--words 300000] [--runs 1]

60 simultaneous requests, each carrying 300,000-word prompts (a third are completions with two
such prompts, a third chat, a third completions with `truncate_prompt_tokens`), while another
process times `GET /health` every 50 ms on its own connection. Bodies are encoded before the
flood starts, so the load generator spends its CPU on sending only. Prints /health p50, p99 and
max idle and under the flood, the statuses, and the API server's own event-loop lag histogram
(`vllm:event_loop_lag_seconds`) over the flood. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.server import ServerProcess  # noqa: E402

HEALTH_PERIOD_S = 0.05


def giant_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    return " ".join(rng.choices(vocab, k=words))


def bodies(n: int, text: str) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            path, body = "/v1/completions", {"prompt": [f"{i} {text}", text], "max_tokens": 4}
        elif kind == 1:
            msgs = [{"role": "user", "content": f"{i} {text}"}]
            path, body = "/v1/chat/completions", {"messages": msgs, "max_tokens": 4}
        else:
            body = {"prompt": f"{i} {text}", "max_tokens": 4, "truncate_prompt_tokens": 200}
            path = "/v1/completions"
        out.append((path, json.dumps(body).encode()))
    return out


def time_health(url: str, stop: Any, out: Any) -> None:
    """In its own process: GET /health every 50 ms until `stop`; latencies in seconds."""
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            client.get("/health")
            latencies.append(time.perf_counter() - t0)
            time.sleep(max(0.0, HEALTH_PERIOD_S - (time.perf_counter() - t0)))
    out.put(latencies)


def sample_health(url: str, seconds: float | None, during: Any = None) -> list[float]:
    """Time /health from another process for `seconds`, or while `during()` runs."""
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=time_health, args=(url, stop, out))
    proc.start()
    time.sleep(1.0)  # the sampler's interpreter starts
    if during is None:
        time.sleep(seconds or 0)
    else:
        during()
    stop.set()
    latencies: list[float] = out.get(timeout=60)
    proc.join(10)
    return latencies


def loop_lag(url: str) -> dict[float, float]:
    text = httpx.get(url + "/metrics", headers={"Cache-Control": "no-cache"}).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:event_loop_lag_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


def describe(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"{name}: p50 {statistics.median(values) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {ordered[-1] * 1e3:.1f} ms ({len(values)} samples)"
    )


async def flood(url: str, requests: list[tuple[str, bytes]]) -> list[int]:
    limits = httpx.Limits(max_connections=len(requests))
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        replies = await asyncio.gather(
            *(client.post(path, content=data, headers=headers) for path, data in requests)
        )
    return [r.status_code for r in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--words", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="flood this running server instead of starting one")
    parser.add_argument(
        "--nice-load",
        type=int,
        default=0,
        help="lower the load generator's CPU priority by this much (the server and the /health "
        "timer keep theirs): tells the server's stalls from the generator's share of the cores",
    )
    args = parser.parse_args()

    text = giant_text(args.words, args.seed)
    requests = bodies(args.requests, text)
    mib = sum(len(d) for _, d in requests) / 2**20
    print(f"{args.requests} requests, {mib:.0f} MiB of JSON; prompt {len(text)} characters")
    srv = None if args.url else ServerProcess("--disable-log-requests").wait_ready()
    url = args.url or srv.url  # type: ignore[union-attr]
    try:
        idle = sample_health(url, 5.0)
        print(describe("/health idle", idle))
        for run in range(args.runs):
            before = loop_lag(url)
            statuses: list[int] = []

            def send(out: list[int] = statuses) -> None:
                before = os.nice(0)
                os.nice(args.nice_load)  # after the timer's process started
                out.extend(asyncio.run(flood(url, requests)))
                os.setpriority(os.PRIO_PROCESS, 0, before)

            t0 = time.perf_counter()
            loaded = sample_health(url, None, send)
            took = time.perf_counter() - t0
            after = loop_lag(url)
            lag = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
            print(f"run {run + 1}: flood took {took:.1f} s; statuses {dict(Counter(statuses))}")
            print("  " + describe("/health under the flood", loaded))
            print(f"  event-loop lag samples by bucket (le -> count): {lag}")
    finally:
        if srv is not None:
            srv.stop()


if __name__ == "__main__":
    main()
