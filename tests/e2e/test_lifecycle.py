"""Every cell of the lifecycle table (DESIGN §4), observed on real servers, deterministically:
loading is stretched with HEADRACE_TEST_LOAD_DELAY, failure is a kill -9 or a SIGSTOP of the
engine, draining is a SIGTERM while a request streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import ServerProcess, poll, process_running, stream_request

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROBE_SCRIPT = REPO / "deploy" / "readiness_probe.sh"
BODY = {"prompt": "Once upon a time", "max_tokens": 4}


def state_gauge(url: str) -> str:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:server_state":
            return next(s.labels["state"] for s in family.samples if s.value == 1.0)
    raise AssertionError("no vllm:server_state")


def table_row(url: str) -> dict[str, int]:
    """The status of every path in the table, right now."""
    return {
        "health": httpx.get(url + "/health").status_code,
        "live": httpx.get(url + "/health/live").status_code,
        "ready": httpx.get(url + "/health/ready").status_code,
        "models": httpx.get(url + "/v1/models").status_code,
        "inference": httpx.post(url + "/v1/completions", json=BODY, timeout=60).status_code,
        "metrics": httpx.get(url + "/metrics").status_code,
    }


def probes(srv: ServerProcess) -> tuple[int, int]:
    cli = subprocess.run(
        [sys.executable, "-m", "headrace", "probe", "--port", str(srv.port), "--timeout", "3"],
        capture_output=True,
    ).returncode
    script = subprocess.run(
        [str(PROBE_SCRIPT), str(srv.port), "127.0.0.1"],
        capture_output=True,
        env={**os.environ, "READINESS_TIMEOUT": "3"},
    ).returncode
    return cli, script


def test_loading_ready_draining_and_probes() -> None:
    srv = ServerProcess(
        "--shutdown-timeout", "20", env={"HEADRACE_TEST_LOAD_DELAY": "8"}
    )  # fmt: skip
    children: list[int] = []
    try:
        # -- loading -------------------------------------------------------------------------
        poll(lambda: httpx.get(srv.url + "/health/live").status_code == 200, 30)
        row = table_row(srv.url)
        assert row == {
            "health": 503, "live": 200, "ready": 503, "models": 503, "inference": 503,
            "metrics": 200,
        }, row  # fmt: skip
        health = httpx.get(srv.url + "/health")
        assert health.json()["status"] == "loading" and health.headers["retry-after"]
        ready = httpx.get(srv.url + "/health/ready")
        assert ready.headers["retry-after"] and ready.json()["status"] == "loading"
        assert 0.0 <= ready.json()["progress"]["fraction"] <= 1.0
        busy = httpx.post(srv.url + "/v1/completions", json=BODY)
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == 503
        assert state_gauge(srv.url) == "loading"
        assert probes(srv) == (1, 1)
        # progress moves while loading
        poll(lambda: httpx.get(srv.url + "/health/ready").json()["progress"]["fraction"] > 0.2, 30)

        # -- ready ---------------------------------------------------------------------------
        srv.wait_ready()
        assert table_row(srv.url) == dict.fromkeys(
            ("health", "live", "ready", "models", "inference", "metrics"), 200
        )
        assert httpx.get(srv.url + "/v1/models").json()["data"]
        assert state_gauge(srv.url) == "ready"
        assert probes(srv) == (0, 0)

        # -- draining: SIGTERM while a long request streams -----------------------------------
        events: list[dict[str, Any]] = []
        long_body = {"prompt": "A long story:", "max_tokens": 150, "ignore_eos": True}
        worker = threading.Thread(target=stream_request, args=(srv.url, long_body, events))
        worker.start()
        poll(lambda: len(events) > 3, 30)  # it is streaming
        children = srv.children()
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        poll(lambda: httpx.get(srv.url + "/health").status_code == 503, 2)
        assert time.monotonic() - sent < 2
        row = table_row(srv.url)
        assert row == {
            "health": 503, "live": 200, "ready": 503, "models": 200, "inference": 503,
            "metrics": 200,
        }, row  # fmt: skip
        assert httpx.get(srv.url + "/health").json()["status"] == "draining"
        assert httpx.get(srv.url + "/health/ready").headers["retry-after"]
        assert state_gauge(srv.url) == "draining"
        assert probes(srv) == (1, 1)
        worker.join(60)
        finals = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
        assert events[-1] == {"done": True}
        assert finals and finals[-1]["choices"][0]["finish_reason"] == "length"
        srv.proc.wait(20 + 5)
        assert srv.proc.returncode == 0
        poll(lambda: not [p for p in children if process_running(p)], 5)
        assert probes(srv) == (1, 1)  # down
    finally:
        srv.stop()


def test_shutdown_timeout_aborts_what_is_left() -> None:
    srv = ServerProcess("--shutdown-timeout", "2").wait_ready()
    try:
        events: list[dict[str, Any]] = []
        body = {"prompt": "An endless story:", "max_tokens": 5000, "ignore_eos": True}
        worker = threading.Thread(target=stream_request, args=(srv.url, body, events))
        worker.start()
        poll(lambda: len(events) > 3, 30)
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        worker.join(30)
        assert events[-1] == {"done": True}
        last = [e for e in events if e.get("choices")][-1]
        assert last["choices"][0]["finish_reason"] == "abort"
        srv.proc.wait(2 + 5)
        assert srv.proc.returncode == 0 and time.monotonic() - sent < 2 + 5
    finally:
        srv.stop()


def test_engine_killed_ends_every_stream_and_restarts_in_place() -> None:
    """M=1: the one engine dies under 8 streams. Each ends within 5 s (error event, [DONE]);
    the server says `restarting` (live 200, everything else 503) until the launcher's
    replacement is ready, then serves again: the same launcher and API server."""
    srv = ServerProcess(env={"HEADRACE_TEST_LOAD_DELAY": "4"}).wait_ready()
    try:
        engine = srv.child_titled("EngineCore_0")
        api_server = srv.child_titled("ApiServer_0")

        async def one(client: httpx.AsyncClient, i: int) -> tuple[list[str], float]:
            lines = []
            body = {"prompt": f"Story {i}:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        if len(lines) == 3 and i == 0:
                            killed.set()
            return lines, time.monotonic()

        killed = asyncio.Event()

        async def run() -> tuple[list[tuple[list[str], float]], float, float]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                tasks = [asyncio.create_task(one(client, i)) for i in range(8)]
                await asyncio.wait_for(killed.wait(), 60)
                await asyncio.sleep(0.5)  # all eight are running
                os.kill(engine, signal.SIGKILL)
                t_kill = time.monotonic()
                health_503 = await _wait_status(client, "/health", 503, 5.0)
                return await asyncio.gather(*tasks), t_kill, health_503

        results, t_kill, health_at = asyncio.run(run())
        assert health_at - t_kill < 5.0
        for lines, ended in results:
            assert ended - t_kill < 5.0
            assert lines[-1] == "[DONE]"
            assert "error" in json.loads(lines[-2])
        row = table_row(srv.url)
        assert row == {
            "health": 503, "live": 200, "ready": 503, "models": 503, "inference": 503,
            "metrics": 200,
        }, row  # fmt: skip
        assert httpx.get(srv.url + "/health").json()["status"] == "restarting"
        refused = httpx.post(srv.url + "/v1/completions", json=BODY)
        assert "restarting" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]
        assert state_gauge(srv.url) == "restarting"
        assert probes(srv) == (1, 1)

        poll(lambda: httpx.get(srv.url + "/health").status_code == 200, 90, 0.2)
        assert httpx.post(srv.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
        assert srv.child_titled("ApiServer_0") == api_server and srv.proc.poll() is None
        assert srv.child_titled("EngineCore_0") != engine
        assert state_gauge(srv.url) == "ready"
        assert restarts(srv.url) == {("0", "SIGKILL"): 1.0}
    finally:
        assert srv.stop() == 0


def test_stalled_engine_is_killed_and_restarted() -> None:
    srv = ServerProcess("--engine-stall-timeout", "2").wait_ready()
    engine = srv.child_titled("EngineCore_0")
    try:
        events: list[dict[str, Any]] = []
        body = {"prompt": "A story:", "max_tokens": 3000, "ignore_eos": True}
        worker = threading.Thread(target=stream_request, args=(srv.url, body, events))
        worker.start()
        poll(lambda: len(events) > 3, 30)
        os.kill(engine, signal.SIGSTOP)  # alive, but makes no progress
        stopped = time.monotonic()
        poll(lambda: httpx.get(srv.url + "/health").status_code == 503, 6)
        assert time.monotonic() - stopped >= 2.0
        assert httpx.get(srv.url + "/health/live").status_code == 200
        worker.join(10)
        assert events[-1] == {"done": True} and "error" in events[-2]
        assert "no step" in events[-2]["error"]["message"]
        poll(lambda: not process_running(engine), 10)  # the launcher killed it
        poll(lambda: httpx.get(srv.url + "/health").status_code == 200, 90, 0.2)
        assert restarts(srv.url) == {("0", "stall"): 1.0}
        assert httpx.post(srv.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGCONT)
        srv.stop()


def restarts(url: str) -> dict[tuple[str, str], float]:
    """vllm:headrace_engine_restarts_total by (engine, reason), fresh."""
    text = httpx.get(url + "/metrics", headers={"Cache-Control": "no-cache"}).text
    return {
        (s.labels["engine"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:headrace_engine_restarts_total"
    }


async def _wait_status(client: httpx.AsyncClient, path: str, status: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout + 1.0
    while time.monotonic() < deadline:
        if (await client.get(path)).status_code == status:
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never answered {status}")
