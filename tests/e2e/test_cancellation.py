"""Clients that go away abort their requests in the engine and free every KV block."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.server import ServerProcess, wait_idle

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.8}


def test_disconnects_abort_and_free_blocks(server: ServerProcess) -> None:
    def first_text(line: str) -> bool:
        """Whether this SSE line brings the first text (of any of the three routes)."""
        if not line.startswith("data: ") or line == "data: [DONE]":
            return False
        event = json.loads(line[6:])
        if event.get("type") == "response.output_text.delta":
            return True
        choice = event.get("choices", [{}])[0]
        return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))

    async def stream_then_leave(client: httpx.AsyncClient, i: int) -> bool:
        body: dict[str, object] = {**LONG, "stream": True}
        if i % 3 == 2:
            path = "/v1/responses"
            body.update(input=f"Tell story number {i}.", max_output_tokens=1500)
        elif i % 3:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": f"Tell story number {i}."}]
        else:
            path = "/v1/completions"
            body["prompt"] = f"Story number {i}:"
        async with client.stream("POST", path, json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if first_text(line):
                    return True  # leaving the block closes the connection mid-stream
        return False

    async def json_then_leave(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=1.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                if i % 2:
                    body = {"input": f"Essay {i}:", "max_output_tokens": 1500, **LONG}
                    await client.post("/v1/responses", json=body)
                else:
                    await client.post("/v1/completions", json={**LONG, "prompt": f"Essay {i}:"})

    async def run() -> list[bool]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            got = await asyncio.gather(
                *(stream_then_leave(client, i) for i in range(100)),
                *(json_then_leave(i) for i in range(8)),
            )
        return [g for g in got if g is not None]

    started = time.monotonic()
    got_first_token = asyncio.run(run())
    assert all(got_first_token) and len(got_first_token) == 100
    # 108 requests x 1,500 tokens would take many minutes: idle within 30 s means they were aborted.
    gauges = wait_idle(server.url)
    assert gauges["vllm:kv_cache_usage_perc"] == 0.0
    assert time.monotonic() - started < 120

    resp = server.client().completions.create(
        model="SmolLM2-135M-Instruct", prompt="After the storm,", max_tokens=8, temperature=0
    )
    assert resp.choices[0].finish_reason == "length" and resp.usage is not None
    assert resp.usage.completion_tokens == 8
    wait_idle(server.url)
