"""Request bodies decoded off the event loop (`api/body.py`), and the API key's comparison."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from headrace.api.body import INLINE_BYTES, BodyDecoder, decode
from headrace.api.errors import APIError
from headrace.api.protocol import ChatCompletionRequest, CompletionRequest
from tests.e2e.server import process_title


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"prompt": "hi"', "not valid JSON"),
        (b'{"prompt": "hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
        (b'{"prompt": "hi", "top_k": 1e400}', "top_k"),
        (b'{"prompt": "hi", "temperature": 1e400}', "temperature"),
        (b'{"prompt": "hi", "top_k": 99999999999}', "top_k"),
        (b'{"prompt": "hi", "temperature": NaN}', "not valid JSON"),
        (b'{"prompt": ""}', "prompt"),
        (b'{"prompt": [false]}', "prompt"),  # found by the fuzzer: lax mode made it token 0
        (b'{"prompt": "hi", "max_tokens": "16"}', "max_tokens"),
        (b'{"prompt": "hi", "ignore_eos": 1}', "ignore_eos"),
        (b"[1, 2]", "dictionary"),
    ],
)
def test_bad_bodies_are_400s_with_a_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(APIError) as exc:
        decode(raw, CompletionRequest)
    assert exc.value.status == 400 and needle in exc.value.message + str(exc.value.param)


class Upload:
    """What `BodyDecoder.parse` reads of a request: its body, in chunks as they arrive."""

    def __init__(self, body: bytes, chunk: int = 48 << 10) -> None:
        self.body, self.chunk = body, chunk

    async def stream(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), self.chunk):
            yield self.body[i : i + self.chunk]
            await asyncio.sleep(0)
        yield b""


async def parse(decoder: BodyDecoder, body: bytes, model: type[Any]) -> Any:
    return await decoder.parse(Upload(body), model)  # type: ignore[arg-type]


def test_fields_set_survive_the_trip_through_the_decoder_process() -> None:
    """Large bodies are streamed to another process and decoded there; what the client set is
    still known (the completions route tells an explicit max_tokens from the default so)."""
    big = "word " * INLINE_BYTES

    async def run() -> tuple[Any, list[Any], APIError]:
        decoder = BodyDecoder(0)
        await decoder.start()
        try:
            small = await parse(decoder, b'{"prompt": "hi", "max_tokens": 5}', CompletionRequest)
            bodies = [b'{"prompt": "%s %d", "n": 2}' % (big.encode(), i) for i in range(4)]
            large = await asyncio.gather(*(parse(decoder, b, CompletionRequest) for b in bodies))
            with pytest.raises(APIError) as exc:
                await parse(decoder, b'{"prompt": "%s", "n": 0}' % big.encode(), CompletionRequest)
            return small, large, exc.value
        finally:
            decoder.shutdown()

    small, large, error = uvloop.run(run())  # the API server's loop
    assert small.model_fields_set == {"prompt", "max_tokens"}
    assert [r.prompt for r in large] == [f"{big} {i}" for i in range(4)]  # each its own body
    assert all(r.n == 2 and "max_tokens" not in r.model_fields_set for r in large)
    assert error.status == 400 and error.param == "n"


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def decoder_pids() -> list[int]:
    return [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and process_title(int(pid)) == "headrace::BodyDecoder_0"
        and parent_of(int(pid)) == os.getpid()
    ]


def test_a_killed_decoder_process_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"prompt": "%s"}' % (b"x" * (4 * INLINE_BYTES))

    async def run() -> tuple[list[int], list[int], list[int]]:
        decoder = BodyDecoder(0)
        await decoder.start()
        try:
            await parse(decoder, body, CompletionRequest)
            first = decoder_pids()
            # killed while bodies are on their way: those are decoded on a thread instead
            in_flight = [asyncio.create_task(parse(decoder, body, CompletionRequest))]
            os.kill(first[0], signal.SIGKILL)
            in_flight += [asyncio.create_task(parse(decoder, body, CompletionRequest))]
            lengths = [len(str(r.prompt)) for r in await asyncio.gather(*in_flight)]
            for _ in range(100):  # the replacement starts
                await asyncio.sleep(0.1)
                if decoder_pids() and decoder_pids() != first:
                    break
            after = await parse(decoder, body, CompletionRequest)
            return first, decoder_pids(), [*lengths, len(str(after.prompt))]
        finally:
            decoder.shutdown()

    first, second, lengths = uvloop.run(run())
    assert len(first) == 1 and len(second) == 1 and first != second
    assert lengths == [4 * INLINE_BYTES] * 3
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


def test_integral_floats_are_integers_and_other_numbers_keep_their_type() -> None:
    req = decode(b'{"prompt": [1.0, 2], "max_tokens": 5.0, "temperature": 1}', CompletionRequest)
    assert req.prompt == [1, 2] and req.max_tokens == 5 and req.temperature == 1.0


def test_prompts_come_back_cut_to_what_tokenizing_reads() -> None:
    from headrace.api.body import PromptBound

    bound = PromptBound(max_model_len=100, max_token_chars=10)
    words = " ".join(f"w{i}" for i in range(5000))
    cut = decode(
        json.dumps({"prompt": [words, "short"], "truncate_prompt_tokens": 20}).encode(),
        CompletionRequest,
        bound,
    )
    assert cut.prompt == [words[-(20 + 16) * 10 :], "short"]  # the same tail the tokenizer reads
    echoed = decode(
        json.dumps({"prompt": words, "truncate_prompt_tokens": 20, "echo": True}).encode(),
        CompletionRequest,
        bound,
    )
    assert echoed.prompt == words
    for body, param in (
        ({"prompt": words, "max_tokens": 5}, "prompt"),
        ({"messages": [{"role": "user", "content": words}]}, "messages"),
    ):
        model = CompletionRequest if "prompt" in body else ChatCompletionRequest
        with pytest.raises(APIError) as exc:
            decode(json.dumps(body).encode(), model, bound)
        assert exc.value.status == 400 and exc.value.param == param
        assert "maximum context length is 100 tokens" in exc.value.message
