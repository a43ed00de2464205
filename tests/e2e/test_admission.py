"""vLLM's admission flags on a real server with two API servers: the limits hold for the whole
server, a refusal is a 503 with an OpenAI error body and Retry-After, and it is counted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.server import (
    ServerProcess,
    engine_gauges,
    poll,
    stream_request,
    sum_by,
    wait_idle,
)

LIMIT = 4
MAX_TOKENS_QUEUED = 300


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--api-server-count", "2",
        "--max-num-seqs", "2",  # a third request waits: its prompt stays in the prefill backlog
        "--max-num-queued-reqs", str(LIMIT),
        "--max-num-queued-tokens", str(MAX_TOKENS_QUEUED),
        "--max-model-len", "1024", "--kv-cache-memory", "128MiB",
    ).wait_ready()  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def rejections(url: str) -> dict[str, float]:
    return sum_by(url, "vllm:admission_rejections_total", "reason")


async def burst(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_keepalive_connections=0)  # new connections: both API servers
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        return list(await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies)))


def check_refusal(resp: httpx.Response, reason_words: str) -> None:
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    error = resp.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
    assert reason_words in error["message"]


class Held:
    """Streaming requests that stay in flight until `release` (closing them aborts them)."""

    def __init__(self, url: str, prompts: list[str]) -> None:
        self.events: list[list[dict[str, Any]]] = [[] for _ in prompts]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(url, p, out), daemon=True)
            for p, out in zip(prompts, self.events, strict=True)
        ]
        for t in self.threads:
            t.start()

    def _run(self, url: str, prompt: str, out: list[dict[str, Any]]) -> None:
        body = {"prompt": prompt, "max_tokens": 900, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(timeout=120) as c,
            c.stream("POST", url + "/v1/completions", json=body) as resp,
        ):
            out.append({"status": resp.status_code})
            for _ in resp.iter_lines():
                if self.stop.is_set():
                    return

    def release(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_a_full_server_refuses_every_request_of_a_burst_whichever_api_server_takes_it(
    server: ServerProcess,
) -> None:
    before = rejections(server.url)
    held = Held(server.url, ["Once upon a time"] * LIMIT)
    try:  # two running, two waiting: the whole server holds LIMIT requests
        poll(lambda: engine_gauges(server.url).get("vllm:num_requests_waiting") == 2, 60)
        replies = asyncio.run(burst(server.url, [{"prompt": "Hi", "max_tokens": 4}] * 28))
        for resp in replies:  # per-server limits would have let up to LIMIT more in
            check_refusal(resp, f"limit of {LIMIT} queued requests")
        for _ in range(4):  # vLLM's /load, from either API server: the whole server's count
            load = httpx.get(server.url + "/load", headers={"Connection": "close"})
            assert load.json() == {"server_load": LIMIT}
    finally:
        held.release()
    assert all(events[0] == {"status": 200} for events in held.events)
    counted = rejections(server.url)
    assert counted.get("max_num_queued_reqs", 0) - before.get("max_num_queued_reqs", 0) == 28
    wait_idle(server.url)
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}


def test_32_simultaneous_requests_get_200_or_503_and_the_accepted_ones_finish(
    server: ServerProcess,
) -> None:
    before = rejections(server.url)
    body = {"prompt": "The capital of France is", "max_tokens": 24, "ignore_eos": True}
    replies = asyncio.run(burst(server.url, [body] * 32))
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert len(ok) >= LIMIT
    for resp in ok:  # finished in full
        choice = resp.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert resp.json()["usage"]["completion_tokens"] == 24
    for resp in refused:
        check_refusal(resp, "queued requests")
    counted = rejections(server.url)
    assert counted["max_num_queued_reqs"] - before.get("max_num_queued_reqs", 0) == len(refused)
    assert wait_idle(server.url)["vllm:num_requests_running"] == 0


def test_queued_prompt_tokens_refuse_once_the_prefill_backlog_is_full(
    server: ServerProcess,
) -> None:
    before = rejections(server.url)
    held = Held(server.url, ["Once upon a time"] * 2)  # both engine slots taken
    long_reply: list[dict[str, Any]] = []
    try:
        poll(lambda: engine_gauges(server.url).get("vllm:num_requests_running") == 2, 60)
        long_prompt = "the quick brown fox jumps over the lazy dog " * 45  # ~400 tokens
        waiter = threading.Thread(
            target=stream_request,
            args=(server.url, {"prompt": long_prompt, "max_tokens": 2}, long_reply),
        )
        waiter.start()
        poll(lambda: engine_gauges(server.url).get("vllm:num_requests_waiting") == 1, 60)
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        check_refusal(resp, f"limit of {MAX_TOKENS_QUEUED} queued prompt tokens")
    finally:
        held.release()
    waiter.join(60)
    assert long_reply[0] == {"status": 200} and long_reply[-1] == {"done": True}
    counted = rejections(server.url)
    assert counted["max_num_queued_tokens"] - before.get("max_num_queued_tokens", 0) == 1
    # with the backlog gone, the same request is served
    resp = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200
    wait_idle(server.url)


def test_a_request_with_more_choices_than_the_limit_is_a_400(server: ServerProcess) -> None:
    resp = httpx.post(
        server.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
