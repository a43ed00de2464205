"""Turning a `RequestStream` into an HTTP answer: SSE events or one JSON body.

Either way a client that goes away aborts its request in the engine (its blocks are freed):
- SSE: Starlette cancels the body iterator on `http.disconnect`; its `finally` aborts.
- JSON: `collect` races the stream against the ASGI disconnect message.
Aborts are sent with `EngineClient.abort`, which never awaits (a cancelled task cannot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import StreamingResponse

from headrace.api.errors import APIError, error_body
from headrace.frontend.client import EngineClient
from headrace.frontend.output import Choice, EngineError, RequestStream, SeqDelta

logger = logging.getLogger("headrace.api")

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


@dataclass(frozen=True, slots=True)
class SseStyle:
    """How a route's stream reads: each event's bytes, the events an engine error becomes, and
    the closing bytes."""

    encode: Callable[[Any], bytes]
    failed: Callable[[str], list[dict[str, Any]]]
    done: bytes


# completions and chat: data-only events, an error as one OpenAI error body, then [DONE]
CHUNKS = SseStyle(sse_event, lambda message: [error_body(500, message)], DONE)


def usage(stream: RequestStream, completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in stream.prompt_token_ids)
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if stream.num_cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": stream.num_cached_tokens}
    return out


async def collect(request: Request, client: EngineClient, stream: RequestStream) -> list[Choice]:
    """Every choice, complete; aborts and raises if the client disconnects first."""
    choices = {s.index: Choice(s.index) for s in stream.seqs}

    async def consume() -> None:
        async for d in stream:
            if d.restart:
                choices[d.index] = Choice(d.index)
                continue
            choices[d.index].add(d)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            client.abort(stream)
    try:
        consumer.result()
    except asyncio.CancelledError:
        raise APIError(499, "client disconnected") from None
    except EngineError as exc:
        if exc.retryable:
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None
        raise APIError(500, str(exc)) from None
    return [choices[i] for i in sorted(choices)]


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse_response(
    client: EngineClient,
    stream: RequestStream,
    chunk_for: Callable[[SeqDelta], list[dict[str, Any]]],
    final_chunks: Callable[[], list[dict[str, Any]]],
    first_chunks: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    style: SseStyle | None = None,
) -> StreamingResponse:
    """One SSE event per delta; `final_chunks` after the last one (usage); then `[DONE]`, or
    as `style` says."""
    style = style or CHUNKS

    async def events() -> AsyncIterator[bytes]:
        try:
            try:
                for chunk in first_chunks or ():
                    yield style.encode(chunk)
                async for delta in stream:
                    if delta.restart:  # never for a choice that streamed: nothing to undo
                        continue
                    for chunk in chunk_for(delta):
                        yield style.encode(chunk)
                for chunk in final_chunks():
                    yield style.encode(chunk)
            except EngineError as exc:
                for chunk in style.failed(str(exc)):
                    yield style.encode(chunk)
            yield style.done
        finally:
            if not stream.finished:
                client.abort(stream)

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
