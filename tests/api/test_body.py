"""Request bodies decoded off the event loop (`api/body.py`), and the API key's comparison."""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import time
from typing import Any

import pytest

from headrace.api.body import INLINE_BYTES, BodyDecoder, decode
from headrace.api.errors import APIError
from headrace.api.protocol import CompletionRequest
from tests.e2e.server import process_title


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"prompt": "hi"', "not valid JSON"),
        (b'{"prompt": "hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
        (b'{"prompt": "hi", "top_k": 1e400}', "out of range"),
        (b'{"prompt": "hi", "top_k": 99999999999}', "top_k"),
        (b'{"prompt": "hi", "temperature": NaN}', "not valid JSON"),
        (b'{"prompt": ""}', "prompt"),
        (b"[1, 2]", "dictionary"),
    ],
)
def test_bad_bodies_are_400s_with_a_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(APIError) as exc:
        decode(raw, CompletionRequest)
    assert exc.value.status == 400 and needle in exc.value.message + str(exc.value.param)


def test_fields_set_survive_the_trip_through_the_decoder_process() -> None:
    """Large bodies are decoded in another process; what the client set is still known (the
    completions route tells an explicit max_tokens from the default this way)."""
    big = "word " * (INLINE_BYTES // 4)

    async def run() -> tuple[Any, Any, APIError]:
        decoder = BodyDecoder(0)
        decoder.start()
        try:
            small = await decoder.decode(b'{"prompt": "hi", "max_tokens": 5}', CompletionRequest)
            large = await decoder.decode(
                b'{"prompt": "%s", "n": 2}' % big.encode(), CompletionRequest
            )
            with pytest.raises(APIError) as exc:
                await decoder.decode(b'{"prompt": "%s", "n": 0}' % big.encode(), CompletionRequest)
            return small, large, exc.value
        finally:
            decoder.shutdown()

    small, large, error = asyncio.run(run())
    assert small.model_fields_set == {"prompt", "max_tokens"}
    assert large.prompt == big and large.n == 2 and "max_tokens" not in large.model_fields_set
    assert error.status == 400 and error.param == "n"


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def test_a_killed_decoder_process_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"prompt": "%s"}' % (b"x" * (2 * INLINE_BYTES))

    def decoder_pids() -> list[int]:
        return [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit()
            and process_title(int(pid)) == "headrace::BodyDecoder_0"
            and parent_of(int(pid)) == os.getpid()
        ]

    async def run() -> list[int]:
        decoder = BodyDecoder(0)
        decoder.start()
        try:
            await decoder.decode(body, CompletionRequest)
            assert len(decoder_pids()) == 1
            for pid in decoder_pids():
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            lengths = []
            for _ in range(3):  # the first notices the death; all are answered
                req = await decoder.decode(body, CompletionRequest)
                lengths.append(len(str(req.prompt)))
            return lengths
        finally:
            decoder.shutdown()

    assert asyncio.run(run()) == [2 * INLINE_BYTES] * 3
    assert "body decoder process died" in caplog.text


def test_the_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """GuardMiddleware checks the Authorization header with hmac.compare_digest."""
    from headrace.api import app as app_module

    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", recording)

    class Ctx:
        class config:
            api_key = "sekret"
            max_request_body_bytes = 1 << 20

    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("reached the app without a key")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    guard = app_module.GuardMiddleware(app, Ctx())  # type: ignore[arg-type]
    scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", b"Bearer x")]}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 401
    assert calls == [(b"Bearer x", b"Bearer sekret")]
