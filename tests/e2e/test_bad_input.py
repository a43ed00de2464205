"""Malformed requests get the documented status and an OpenAI error body, and never disturb a
well-formed request running beside them."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest

from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG_PROMPT = " ".join(f"w{i}" for i in range(600))  # over 2,048 tokens, under the guards

# (name, path, body or raw bytes, content type, expected status, text the message must contain)
CASES: list[tuple[str, str, Any, str, int, str]] = [
    ("max_tokens wrong type", CHAT, {"messages": MSG, "max_tokens": "many"}, "json", 400, "max_tokens"),
    ("negative max_tokens", COMP, {"prompt": "hi", "max_tokens": -3}, "json", 400, "max_tokens"),
    ("huge max_tokens", COMP, {"prompt": "hi", "max_tokens": 10**7}, "json", 400, "2048"),
    ("empty messages", CHAT, {"messages": []}, "json", 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "json", 400, "role"),
    ("bad JSON", CHAT, b'{"messages": [', "json", 400, "JSON"),
    ("wrong content type", CHAT, json.dumps({"messages": MSG}).encode(), "text/plain", 400, "Content-Type"),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": MSG}, "json", 404, "gpt-9"),
    ("prompt over max_model_len", COMP, {"prompt": LONG_PROMPT, "max_tokens": 5}, "json", 400, "2048"),
    ("top_p above 1", CHAT, {"messages": MSG, "top_p": 1.5}, "json", 400, "top_p"),
    ("negative temperature", CHAT, {"messages": MSG, "temperature": -0.5}, "json", 400, "temperature"),
    ("n = 0", COMP, {"prompt": "hi", "n": 0}, "json", 400, "n"),
    ("missing messages", CHAT, {"model": "SmolLM2-135M-Instruct"}, "json", 400, "messages"),
    ("missing prompt", COMP, {"max_tokens": 3}, "json", 400, "prompt"),
    ("stop of wrong type", COMP, {"prompt": "hi", "stop": 5}, "json", 400, "stop"),
    ("logprobs over 20", COMP, {"prompt": "hi", "logprobs": 50}, "json", 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, {"messages": MSG, "top_logprobs": 2}, "json", 400, "logprobs"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "json", 400, "messages"),
    ("stream_options without stream", CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, "json", 400, "stream"),
    ("presence_penalty out of range", CHAT, {"messages": MSG, "presence_penalty": 3}, "json", 400, "presence_penalty"),
    ("body is a JSON array", COMP, [1, 2], "json", 400, "dictionary"),
    ("token id out of vocabulary", COMP, {"prompt": [1, 10**9]}, "json", 400, "token ids"),
    ("min_tokens above max_tokens", COMP, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, "json", 400, "min_tokens"),
    ("empty prompt", COMP, {"prompt": ""}, "json", 400, "prompt"),
    ("truncate_prompt_tokens = 0", COMP, {"prompt": "hi", "truncate_prompt_tokens": 0}, "json", 400, "truncate"),
    # found by the fuzzer: a truncation this large overflowed a slice (500)
    ("huge truncate_prompt_tokens", COMP, {"prompt": "hi", "truncate_prompt_tokens": 10**30}, "json", 400, "truncate"),
    ("truncate over the context", CHAT, {"messages": MSG, "truncate_prompt_tokens": 5000}, "json", 400, "context length"),
    ("top_k beyond int32", COMP, {"prompt": "hi", "top_k": 10**30}, "json", 400, "top_k"),
    ("token id beyond int64", COMP, {"prompt": [1, 10**30]}, "json", 400, "prompt"),
    ("Infinity temperature", COMP, b'{"prompt": "hi", "temperature": Infinity}', "json", 400, "not valid JSON"),
    ("NaN top_p", COMP, b'{"prompt": "hi", "top_p": NaN}', "json", 400, "not valid JSON"),
    ("temperature overflowing to infinity", COMP, b'{"prompt": "hi", "temperature": 1e400}', "json", 400, "temperature"),
    ("integral float for an integer", COMP, {"prompt": "hi", "max_tokens": 3.5}, "json", 400, "max_tokens"),
    # an engine once indexed the logits with these and failed every request in its step
    ("stop_token_ids out of vocabulary", COMP, {"prompt": "hi", "min_tokens": 2, "stop_token_ids": [10**6]}, "json", 400, "stop_token_ids"),
    ("logit_bias id out of vocabulary", CHAT, {"messages": MSG, "logit_bias": {"1000000": 5}}, "json", 400, "logit_bias"),
    ("logit_bias key not a token id", COMP, {"prompt": "hi", "logit_bias": {"hi": 5}}, "json", 400, "logit_bias"),
    ("empty allowed_token_ids", COMP, {"prompt": "hi", "allowed_token_ids": []}, "json", 400, "allowed_token_ids"),
    ("allowed_token_ids out of vocabulary", COMP, {"prompt": "hi", "allowed_token_ids": [3, 10**6]}, "json", 400, "allowed_token_ids"),
]  # fmt: skip


def _check_error(body: dict[str, Any], status: int, needle: str, name: str) -> None:
    err = body.get("error")
    assert isinstance(err, dict), (name, body)
    assert set(err) == {"message", "type", "param", "code"}, (name, err)
    assert err["code"] == status and isinstance(err["type"], str), (name, err)
    assert needle.lower() in str(err["message"]).lower() + str(err["param"]).lower(), (name, err)


def test_malformed_requests_beside_a_good_one(server: ServerProcess) -> None:
    async def bad(client: httpx.AsyncClient, case: tuple[str, str, Any, str, int, str]) -> None:
        name, path, body, ctype, status, needle = case
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json" if ctype == "json" else ctype}
        resp = await client.post(path, content=content, headers=headers)
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        _check_error(resp.json(), status, needle, name)

    async def good(client: httpx.AsyncClient) -> str:
        body = {"messages": MSG, "max_tokens": 40, "temperature": 0, "stream": True}
        text = ""
        async with client.stream("POST", CHAT, json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        return text

    async def run() -> str:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            results = await asyncio.gather(good(client), *(bad(client, c) for c in CASES))
            alone = await good(client)
        assert results[0] == alone and alone
        return alone

    assert len(CASES) >= 15
    asyncio.run(run())


def test_oversize_body_is_413_before_it_is_read(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    _check_error(json.loads(body), 413, "larger than", "oversize")


def test_prompt_too_long_names_both_numbers(server: ServerProcess) -> None:
    resp = httpx.post(server.url + COMP, json={"prompt": LONG_PROMPT, "max_tokens": 5})
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": LONG_PROMPT}).json()["count"]
    message = resp.json()["error"]["message"]
    assert "2048" in message and str(tokens) in message, message
