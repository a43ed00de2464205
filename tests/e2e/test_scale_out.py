"""Scale-out with real processes: API servers x engines behind one port with the coordinator's
load vector, pinning, and a headless node joining the head over TCP on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from typing import Any

import httpx

from tests.e2e.server import (
    ServerProcess,
    free_port,
    poll,
    process_running,
    stream_request,
    sum_by,
    wait_idle,
)

SMALL = ("--max-model-len", "1024", "--kv-cache-memory", "128MiB")


def by_engine(url: str, name: str = "vllm:request_success_total") -> dict[str, float]:
    return sum_by(url, name, "engine")


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


async def burst(url: str, bodies: list[dict[str, Any]], headers: dict[str, str]) -> list[int]:
    limits = httpx.Limits(max_keepalive_connections=0)  # new connections: both API servers
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        replies = await asyncio.gather(
            *(c.post("/v1/completions", json=b, headers=headers) for b in bodies)
        )
    return [r.status_code for r in replies]


def test_two_api_servers_two_engines_split_pin_and_count_once() -> None:
    srv = ServerProcess(
        "--api-server-count", "2", "--data-parallel-size", "2", "--log-stats-interval", "1", *SMALL
    ).wait_ready()
    try:
        titles = ["ApiServer_0", "ApiServer_1", "EngineCore_0", "EngineCore_1", "Coordinator"]
        assert all(srv.child_titled(t) for t in titles)
        before = by_engine(srv.url)
        bodies = [{"prompt": f"Hi {i}", "max_tokens": 6, "ignore_eos": True} for i in range(40)]
        assert asyncio.run(burst(srv.url, bodies, {})) == [200] * 40
        wait_idle(srv.url)
        split = delta(by_engine(srv.url), before)
        assert sum(split.values()) == 40
        assert min(split.values()) >= 40 / 3, split
        for _ in range(6):  # whichever API server answers has every request
            assert sum(delta(by_engine(srv.url), before).values()) == 40

        before = by_engine(srv.url)
        pinned = [{"prompt": f"Pin {i}", "max_tokens": 3} for i in range(3)]
        assert asyncio.run(burst(srv.url, pinned, {"X-data-parallel-rank": "1"})) == [200] * 3
        in_body = [{**b, "data_parallel_rank": 1} for b in pinned]
        assert asyncio.run(burst(srv.url, in_body, {})) == [200] * 3
        assert delta(poll(lambda: by_engine(srv.url), 5), before) == {"0": 0.0, "1": 6.0}

        for headers, body in (
            ({"X-data-parallel-rank": "7"}, {}),
            ({}, {"data_parallel_rank": 7}),
            ({"X-data-parallel-rank": "one"}, {}),
            ({"X-data-parallel-rank": "0"}, {"data_parallel_rank": 1}),
        ):
            r = httpx.post(
                srv.url + "/v1/completions",
                json={"prompt": "Hi", "max_tokens": 2, **body},
                headers=headers,
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "data_parallel_rank"
        assert "ranks 0..1" in r.text or "disagree" in r.text
        time.sleep(1.5)  # at least one stats interval with the counts above
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    stats = re.findall(r"INFO (\S+) headrace.stats: Engine 00(\d)", log)
    assert stats and {who for who, _ in stats} == {"ApiServer_0"}
    assert {engine for _, engine in stats} == {"0", "1"}
    for once in ("tokenizer loaded", "engine 0 ready:", "engine 1 ready:"):
        assert log.count(once) == 1, once


def test_headless_node_joins_is_lost_rejoins_and_stops_with_the_head() -> None:
    rpc = str(free_port())
    topology = ("--data-parallel-size", "2", "--data-parallel-size-local", "1")
    topology += ("--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", rpc)
    head = ServerProcess(*topology, *SMALL)
    node_args = ("--headless", "--data-parallel-start-rank", "1", *topology, *SMALL)
    nodes: list[ServerProcess] = []
    try:
        # A node of another topology is refused with the reason and exits 1, loading nothing.
        wrong = list(node_args)
        wrong[wrong.index("2")] = "3"  # --data-parallel-size 3
        bad = ServerProcess(*wrong)
        assert bad.proc.wait(60) == 1
        assert "refused this node: this node says --data-parallel-size 3" in bad.log.read_text()

        nodes.append(ServerProcess(*node_args))
        head.wait_ready()
        assert on_rank_1(head).choices[0].finish_reason == "length"
        assert by_engine(head.url)["1"] == 1

        # A stream on rank 1 is running when the whole node dies.
        events: list[dict[str, Any]] = []
        body = {"prompt": "Once", "max_tokens": 900, "ignore_eos": True, "data_parallel_rank": 1}
        streamer = threading.Thread(target=stream_request, args=(head.url, body, events))
        streamer.start()
        poll(lambda: len(events) > 3, 30)
        os.kill(nodes[0].proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        poll(lambda: httpx.get(head.url + "/health").json()["status"] == "degraded", 5)
        assert time.monotonic() - killed < 5.0
        streamer.join(10)
        assert not streamer.is_alive(), "the stream on the lost rank hangs"
        assert events[-1] == {"done": True} and "error" in events[-2]
        assert httpx.get(head.url + "/health/ready").status_code == 200  # rank 0 serves
        r = httpx.post(head.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        r = httpx.post(
            head.url + "/v1/completions",
            json={"prompt": "Hi", "max_tokens": 2},
            headers={"X-data-parallel-rank": "1"},
        )
        assert r.status_code == 503 and "Retry-After" in r.headers

        # A new node takes rank 1 back, and the head is ready again.
        nodes.append(ServerProcess(*node_args))
        poll(lambda: httpx.get(head.url + "/health").json()["status"] == "ready", 120, 0.2)
        assert on_rank_1(head).choices[0].finish_reason == "length"
        engine_pids = [p for p in _descendants(nodes[1].proc.pid)]
        assert engine_pids
    finally:
        head_code = head.stop()
        for node in nodes:
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
    assert head_code == 0, head.log_tail()
    assert nodes[1].proc.returncode == 0, nodes[1].log_tail()
    assert "the head is stopping" in nodes[1].log.read_text()
    poll(lambda: not any(process_running(p) for p in engine_pids), 10)


def on_rank_1(srv: ServerProcess) -> Any:
    return srv.client().completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="Hello",
        max_tokens=4,
        extra_headers={"X-data-parallel-rank": "1"},
    )


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]
