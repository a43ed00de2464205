"""The event loop stays free while giant prompts are uploaded, checked, tokenized and run."""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time

import httpx
import pytest

from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.slow


def _health_latencies(url: str, stop: threading.Event | None, count: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as client:
        while (stop is None and len(out) < count) or (stop is not None and not stop.is_set()):
            t0 = time.perf_counter()
            assert client.get("/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.01)
    return out


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def test_health_stays_fast_under_giant_prompts(server: ServerProcess) -> None:
    rng = random.Random(0)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(2000)
    ]
    words: list[str] = []
    while sum(map(len, words)) + len(words) < 300_000:
        words.append(rng.choice(vocab))
    giant = " ".join(words)[:300_000]
    assert len(giant) == 300_000

    idle = _health_latencies(server.url, None, 100)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body: dict[str, object] = {"prompt": f"{i} {giant}", "max_tokens": 4}
        if i % 2:  # half are tokenized and run (truncated), half refused as too long
            body["truncate_prompt_tokens"] = 200
        resp = await client.post("/v1/completions", json=body)
        return resp.status_code

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    stop = threading.Event()
    loaded: list[float] = []
    sampler = threading.Thread(
        target=lambda: loaded.extend(_health_latencies(server.url, stop, 0)), daemon=True
    )
    sampler.start()
    try:
        statuses = asyncio.run(load())
    finally:
        stop.set()
        sampler.join(60)
    assert sorted(set(statuses)) == [200, 400], statuses
    assert statuses.count(200) == 25
    assert len(loaded) >= 20, len(loaded)
    idle_p99, loaded_p99 = _p99(idle), _p99(loaded)
    print(
        f"/health idle p50 {statistics.median(idle) * 1e3:.1f} ms p99 {idle_p99 * 1e3:.1f} ms; "
        f"under load p50 {statistics.median(loaded) * 1e3:.1f} ms p99 {loaded_p99 * 1e3:.1f} ms "
        f"({len(loaded)} samples)"
    )
    assert loaded_p99 < 0.100
    assert loaded_p99 < 20 * idle_p99
