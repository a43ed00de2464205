"""Self-healing with real processes and kill -9 by process title: a lost engine or API server
is started again in place while the rest keep serving; past the restart limit, failed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.e2e.server import ServerProcess, fresh_samples, poll, process_running
from tests.e2e.test_lifecycle import restarts, table_row

pytestmark = pytest.mark.slow

SMALL = ("--max-model-len", "1024", "--kv-cache-memory", "128MiB")
BODY = {"prompt": "Once upon a time", "max_tokens": 4}


def totals(url: str) -> dict[str, float]:
    """Counter totals over every label set, from a fresh scrape on a new connection."""
    out: dict[str, float] = {}
    for s in fresh_samples(url):
        if s.name.endswith("_total"):
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


class LiveWatch:
    """Polls /health/live every 50 ms in a thread; remembers every status it saw."""

    def __init__(self, url: str) -> None:
        self.url, self.seen, self.stop = url, set[int](), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self.stop.is_set():
                try:
                    self.seen.add(c.get(self.url + "/health/live").status_code)
                except httpx.HTTPError:
                    self.seen.add(0)
                time.sleep(0.05)

    def done(self) -> set[int]:
        self.stop.set()
        self.thread.join(5)
        return self.seen


async def stream_one(client: httpx.AsyncClient, i: int, started: list[int]) -> dict[str, Any]:
    body = {"prompt": f"Tale {i}:", "max_tokens": 24, "ignore_eos": True, "stream": True}
    events: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    started.append(i)
    return {"events": events, "ended": time.monotonic()}


def test_engine_killed_under_load_the_other_keeps_serving() -> None:
    srv = ServerProcess("--data-parallel-size", "2", *SMALL).wait_ready()
    try:
        victim = srv.child_titled("EngineCore_1")
        live = LiveWatch(srv.url)

        async def run() -> tuple[list[dict[str, Any]], list[httpx.Response], float, list[int]]:
            started: list[int] = []
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                streams = [asyncio.create_task(stream_one(client, i, started)) for i in range(16)]
                # non-streaming requests show their client nothing until the end: re-sendable
                whole = [
                    asyncio.create_task(
                        client.post(
                            "/v1/completions",
                            json={"prompt": f"Fable {i}:", "max_tokens": 60, "ignore_eos": True},
                        )
                    )
                    for i in range(4)
                ]
                deadline = time.monotonic() + 60
                while len(started) < 16 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                after = [await client.post("/v1/completions", json=BODY) for _ in range(10)]
                replies = [*await asyncio.gather(*whole), *after]
                return await asyncio.gather(*streams), replies, killed, started

        results, replies, killed, started = asyncio.run(run())
        assert len(started) == 16
        errors = 0
        for r in results:
            assert r["ended"] - killed < 15.0, "a stream hangs"
            assert r["events"][-1] == "[DONE]"
            errors += "error" in json.loads(r["events"][-2])
        assert 0 < errors < 16  # those on engine 1 ended with an error; the others finished
        assert [r.status_code for r in replies] == [200] * 14
        assert all(r.json()["usage"]["completion_tokens"] in (60, 4) for r in replies)
        counts = totals(srv.url)
        assert counts["vllm:headrace_requests_lost_total"] == errors
        assert counts["vllm:headrace_requests_resent_total"] >= 1  # engine 1's whole ones

        def rank_1_serves() -> bool:
            r = httpx.post(
                srv.url + "/v1/completions", json=BODY, headers={"X-data-parallel-rank": "1"}
            )
            return r.status_code == 200

        poll(rank_1_serves, 90, 0.5)
        assert live.done() == {200}
        assert restarts(srv.url) == {("1", "SIGKILL"): 1.0}
        assert httpx.get(srv.url + "/health").json()["status"] == "ready"
    finally:
        assert srv.stop() == 0


def test_api_server_killed_is_restarted_and_counts_stay_whole() -> None:
    srv = ServerProcess("--api-server-count", "2", *SMALL).wait_ready()
    try:
        # API server 1 takes connections only once it and API server 0 can serve: no 503 from
        # a sibling still loading after the probe said ready
        for _ in range(6):
            assert httpx.post(srv.url + "/v1/completions", json=BODY).status_code == 200
        poll(lambda: "API server 1 takes connections: ready" in srv.log.read_text(), 10)
        before = poll(lambda: totals(srv.url), 5)
        assert before["vllm:request_success_total"] == 6
        victim = srv.child_titled("ApiServer_1")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        codes = []
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for _ in range(20):
                codes.append(c.post("/v1/completions", json=BODY).status_code)
        assert codes == [200] * 20

        def back() -> bool:
            try:
                pid = srv.child_titled("ApiServer_1")
            except LookupError:
                return False
            return pid != victim and "is back: ready" in srv.log.read_text()

        poll(back, 60, 0.2)
        assert time.monotonic() - killed < 60
        for _ in range(8):  # either API server may answer; each has every count, once
            now = totals(srv.url)
            assert now["vllm:request_success_total"] == 26
            assert now["vllm:generation_tokens_total"] == 26 * 4
            assert now["vllm:headrace_api_server_restarts_total"] == 1
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=srv.url, timeout=60, limits=limits) as c:
            assert all(c.post("/v1/completions", json=BODY).status_code == 200 for _ in range(10))
    finally:
        assert srv.stop() == 0


def test_api_server_0_killed_while_loading_is_replaced_and_answers_at_once() -> None:
    """At start-up only API server 0 answers (the others wait until it has served). Its
    replacement, while nobody has served yet, answers at once too: probes see `loading`, not
    silence until the model is in."""
    srv = ServerProcess("--api-server-count", "2", *SMALL, env={"HEADRACE_TEST_LOAD_DELAY": "25"})
    try:
        first = poll(lambda: _health(srv.url), 60, 0.2)
        assert first["status"] == "loading"
        victim = srv.child_titled("ApiServer_0")
        os.kill(victim, signal.SIGKILL)
        poll(lambda: not process_running(victim) or None, 10)
        killed = time.monotonic()
        again = poll(lambda: _health(srv.url), 30, 0.2)
        assert again["status"] == "loading", (again, srv.log_tail())
        assert time.monotonic() - killed < 15
        assert srv.child_titled("ApiServer_0") != victim
        srv.wait_ready(120)
        assert httpx.post(srv.url + "/v1/completions", json=BODY).status_code == 200
        assert totals(srv.url)["vllm:headrace_api_server_restarts_total"] == 1
    finally:
        assert srv.stop() == 0


def _health(url: str) -> dict[str, Any] | None:
    """/health's body, or None when nobody answers within a probe's second."""
    try:
        return dict(httpx.get(url + "/health", timeout=1).json())
    except httpx.HTTPError:
        return None


def test_an_engine_that_dies_at_every_restart_ends_failed() -> None:
    srv = ServerProcess(
        "--max-engine-restarts", "2", *SMALL, env={"HEADRACE_TEST_ENGINE_DIES_FROM_START": "1"}
    ).wait_ready()
    try:
        engine = srv.child_titled("EngineCore_0")
        os.kill(engine, signal.SIGKILL)
        poll(lambda: httpx.get(srv.url + "/health/live").status_code == 503, 60, 0.2)
        body = httpx.get(srv.url + "/health").json()
        assert body["status"] == "failed" and "out of restarts" in body["error"]
        row = table_row(srv.url)
        assert row == {
            "health": 503, "live": 503, "ready": 503, "models": 503, "inference": 503,
            "metrics": 200,
        }, row  # fmt: skip
        counted = restarts(srv.url)
        assert counted[("0", "SIGKILL")] == 1 and counted[("0", "exit 1")] == 1
        assert not process_running(engine)
    finally:
        assert srv.stop() == 0
