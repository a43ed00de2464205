"""Limits a public endpoint needs, against a real server over raw sockets: slow clients time out
without holding up anyone else, oversized headers and URLs are refused, and hostile JSON (deep,
huge) is a quick 4xx. Every refusal is an OpenAI error body."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from headrace.api.app import BODY_IDLE_TIMEOUT_S
from headrace.api.http_limits import HEADER_TIMEOUT_S, MAX_HEADER_BYTES, MAX_HEADERS
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--max-model-len", "512", "--kv-cache-memory", "64MiB").wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


def raw_exchange(port: int, chunks: list[bytes], pause: float = 0.0, timeout: float = 30) -> bytes:
    """Send `chunks` (pausing between them) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:  # the server closed on us: read what it said
                break
            time.sleep(pause)
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                break
            if not data:
                break
            out += data
    return out


def status_and_error(reply: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_slow_headers_and_slow_bodies_time_out_while_others_are_served(
    server: ServerProcess,
) -> None:
    replies: dict[str, bytes] = {}
    slow_headers = [b"GET /health HTTP/1.1\r\n"] + [b"X-a: b\r\n"] * 100  # a header per second
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    slow_body = [head + body[:5]]  # then nothing: the client stalls mid-body

    def run(name: str, chunks: list[bytes], pause: float) -> None:
        replies[name] = raw_exchange(server.port, chunks, pause)

    t0 = time.monotonic()
    threads = [
        threading.Thread(target=run, args=("headers", slow_headers, 1.0)),
        threading.Thread(target=run, args=("body", slow_body, 0.0)),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    for _ in range(5):  # meanwhile the server answers everyone else at once
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert resp.status_code == 200
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    assert took < max(HEADER_TIMEOUT_S, BODY_IDLE_TIMEOUT_S) + 8, took
    status, error = status_and_error(replies["headers"])
    assert status == 408 and "headers" in str(error["message"])
    status, error = status_and_error(replies["body"])
    assert status == 408 and "body" in str(error["message"])


@pytest.mark.parametrize(
    ("name", "request_head", "status"),
    [
        ("too many headers", b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 5)), 431),
        ("headers too large", b"X-big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n", 431),
        ("a header line that never ends", b"X-big: " + b"a" * (4 * MAX_HEADER_BYTES), 431),
    ],
)
def test_oversized_headers_are_refused(
    server: ServerProcess, name: str, request_head: bytes, status: int
) -> None:
    reply = raw_exchange(server.port, [b"GET /health HTTP/1.1\r\nHost: x\r\n" + request_head])
    got, error = status_and_error(reply)
    assert got == status, (name, reply[:200])
    assert error["code"] == status and error["type"]


def test_a_very_long_url_is_414_and_garbage_is_an_openai_400(server: ServerProcess) -> None:
    long_url = b"/health?" + b"a" * (20 << 10)
    got, error = status_and_error(
        raw_exchange(server.port, [b"GET " + long_url + b" HTTP/1.1\r\n"])
    )
    assert got == 414 and error["code"] == 414
    got, error = status_and_error(raw_exchange(server.port, [b"NOT HTTP AT ALL\r\n\r\n"]))
    assert got == 400 and error["type"] == "BadRequestError"


def test_hostile_json_is_refused_quickly(server: ServerProcess) -> None:
    url = server.url + "/v1/completions"
    headers = {"content-type": "application/json"}
    deep = b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    t0 = time.monotonic()
    resp = httpx.post(url, content=deep, headers=headers, timeout=60)
    assert resp.status_code == 400 and "nested too deeply" in resp.json()["error"]["message"]
    assert time.monotonic() - t0 < 2.0
    huge = b'{"prompt": "' + b"a" * (50 << 20) + b'", "max_tokens": 4}'
    t0 = time.monotonic()
    resp = httpx.post(url, content=huge, headers=headers, timeout=60)
    assert resp.status_code == 400 and "maximum context length" in resp.json()["error"]["message"]
    assert time.monotonic() - t0 < 10.0
    # and the server is fine afterwards
    ok = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
