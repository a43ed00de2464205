"""Request bodies decoded and validated away from the event loop.

A 300,000-word prompt is a 2 MB JSON string. FastAPI decodes and validates a declared body on the
event loop (17 ms for two such prompts); sixty such requests at once held `/health` for 115-330
ms (benchmarks/flood.py). A thread does not help: decoding is one C call that holds the GIL for
its whole length. Nor does building the body first and handing it over: in this VM a
multi-megabyte buffer costs milliseconds of page faults each time it is made.

So a body over `INLINE_BYTES` is streamed, chunk by chunk as it arrives, to a helper process
(`headrace::BodyDecoder_<i>`, one per API server) over a socket pair; the loop never joins it.
The decoder assembles it, decodes it (msgspec), validates it (pydantic), cuts its prompts to
what tokenizing will read (a 2 MB prompt truncated to 200 tokens comes back as a few kilobytes;
one too long to fit at all is refused there), and sends back the validated request, pickled, or
the 400. Smaller bodies are decoded inline, which is cheaper than the trip. A decoder process
that dies is reported and replaced; the requests it had are decoded on a thread from the chunks
the route still holds.

Errors are the 400s FastAPI's validation gave (`errors.validation_message`): bad JSON, nesting
too deep, numbers out of range, and every field error with its path. Types are checked strictly,
as `/openapi.json` states them: `true` is not a token id and `"16"` is not a `max_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import pickle
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar, cast

import msgspec
from fastapi import Request
from pydantic import BaseModel, ValidationError

from headrace.api.errors import APIError, validation_message
from headrace.api.protocol import ChatCompletionRequest, CompletionRequest
from headrace.api.responses_request import ResponsesRequest
from headrace.frontend.tokenize import PromptLimits, PromptTooLongError, cut_text, too_long_message
from headrace.process import die_with_parent, set_title

logger = logging.getLogger("headrace.api")

INLINE_BYTES = 64 << 10  # smaller bodies: cheaper to decode here than to send away

M = TypeVar("M", bound=BaseModel)

# API server -> decoder: (request id, kind, payload length) + payload
_TO_DECODER = struct.Struct("<QBI")
_CHUNK, _END, _DROP = 0, 1, 2  # END's payload: (model class, PromptBound | None), pickled
# decoder -> API server: (request id, payload length) + pickled ("ok", model) or ("error", APIError)
_FROM_DECODER = struct.Struct("<QI")


def _number(text: str) -> int | float:
    """JSON has one number type: 5.0 is the integer 5 (as JSON Schema says), so an integer
    field takes it under strict validation; every other float stays one."""
    value = float(text)
    return int(value) if value.is_integer() else value


_json = msgspec.json.Decoder(float_hook=_number)


@dataclass(frozen=True, slots=True)
class PromptBound:
    """What the server can take: giant prompts are cut (or refused) before they come back."""

    max_model_len: int
    max_token_chars: int


def cut_prompts(req: BaseModel, bound: PromptBound) -> None:
    """Keep of each prompt only what tokenizing will read (`frontend.tokenize.cut_text`), or
    refuse one that cannot fit whatever it tokenizes to, with the route's own message."""
    chars = bound.max_token_chars
    if isinstance(req, CompletionRequest):
        truncate = req.truncate_prompt_tokens
        if req.echo or (truncate is not None and truncate > bound.max_model_len):
            return  # echo answers with the prompt as given; the route refuses the other
        explicit = req.max_tokens if "max_tokens" in req.model_fields_set else None
        limits = PromptLimits(bound.max_model_len, explicit, truncate)
        try:
            if isinstance(req.prompt, str):
                req.prompt = cut_text(req.prompt, limits, chars)
            elif req.prompt and isinstance(req.prompt[0], str):
                req.prompt = [cut_text(str(p), limits, chars) for p in req.prompt]
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="prompt") from None
    elif isinstance(req, ChatCompletionRequest) and req.truncate_prompt_tokens is None:
        total = sum(m.num_chars() for m in req.messages)  # the template only adds to it
        _refuse_over(total, bound, req.requested_max_tokens, "messages")
    elif isinstance(req, ResponsesRequest) and req.truncation != "auto":
        _refuse_over(req.num_chars(), bound, req.max_output_tokens, "input")


def _refuse_over(total: int, bound: PromptBound, max_tokens: int | None, param: str) -> None:
    """400 for text that cannot fit the context however it tokenizes."""
    if total > bound.max_model_len * bound.max_token_chars:
        limits = PromptLimits(bound.max_model_len, max_tokens)
        message = too_long_message(math.ceil(total / bound.max_token_chars), limits, at_least=True)
        raise APIError(400, message, param=param)


def decode(raw: bytes, model: type[M], bound: PromptBound | None = None) -> M:
    """JSON bytes -> a validated `model` (its prompts cut to `bound`), or APIError 400."""
    try:
        obj = _json.decode(raw)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON (nested too deeply)") from None
    try:  # strict: what the schema says, no true for 1 or "16" for 16
        req = model.model_validate(obj, strict=True)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise APIError(400, message, param) from None
    if bound is not None:
        cut_prompts(req, bound)
    return req


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's JSON body as a validated `model` (the route's first step)."""
    ctx = request.app.state.ctx
    bound = None
    if ctx.tokenizer is not None and ctx.client.max_model_len:
        bound = PromptBound(ctx.client.max_model_len, ctx.tokenizer.max_token_chars)
    bodies: BodyDecoder = ctx.bodies
    return await bodies.parse(request, model, bound)


class BodyDecoder:
    """Decodes request bodies: small ones inline, large ones in the helper process."""

    def __init__(self, api_index: int) -> None:
        self.title = f"BodyDecoder_{api_index}"
        self._process: BaseProcess | None = None
        self._link: _Link | None = None
        self._ids = itertools.count()
        self._fallback = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-decoder")

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=run_decoder, args=(theirs, self.title), daemon=True)
        proc.start()
        theirs.close()
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: _Link(self), sock=ours)
        self._process, self._link = proc, link

    async def parse(self, request: Request, model: type[M], bound: PromptBound | None = None) -> M:
        chunks: list[bytes] = []
        size, rid, link = 0, -1, None
        try:
            async for chunk in request.stream():
                chunks.append(chunk)
                size += len(chunk)
                if link is None and size > INLINE_BYTES and self._link is not None:
                    link, rid = self._link, next(self._ids)
                    for earlier in chunks:
                        link.send(rid, _CHUNK, earlier)
                elif link is not None:
                    link.send(rid, _CHUNK, chunk)
        except BaseException:
            if link is not None:
                link.send(rid, _DROP, b"")
            raise
        if link is None:
            if size <= INLINE_BYTES:
                return decode(b"".join(chunks), model, bound)
            return await self._on_thread(chunks, model, bound)
        try:
            return await link.result(rid, model, bound)
        except _DecoderLostError:
            return await self._on_thread(chunks, model, bound)

    async def _on_thread(self, chunks: list[bytes], model: type[M], bound: PromptBound | None) -> M:
        loop = asyncio.get_running_loop()
        work = lambda: decode(b"".join(chunks), model, bound)  # noqa: E731
        return await loop.run_in_executor(self._fallback, work)

    def lost(self, link: _Link) -> None:
        """The decoder process is gone (its socket closed): start another."""
        if link is not self._link:
            return
        self._link = None
        code = self._process.exitcode if self._process is not None else None
        logger.error("the body decoder process died (exit code %s); starting a new one", code)
        task = asyncio.get_running_loop().create_task(self.start())
        task.add_done_callback(_log_failure)

    def shutdown(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
        if self._process is not None:
            self._process.join(1.0)
            if self._process.is_alive():
                self._process.kill()
        self._fallback.shutdown(wait=False, cancel_futures=True)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "the body decoder could not start: %r (bodies decode on a thread)", task.exception()
        )


class _DecoderLostError(Exception):
    pass


class _Link(asyncio.Protocol):
    """The API server's end of the socket pair: frames out, results in."""

    def __init__(self, owner: BodyDecoder) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.inbox = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, rid: int, kind: int, payload: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines([_TO_DECODER.pack(rid, kind, len(payload)), payload])

    async def result(self, rid: int, model: type[M], bound: PromptBound | None) -> M:
        if self.closed:
            raise _DecoderLostError
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        self.send(rid, _END, pickle.dumps((model, bound)))
        try:
            status, value = await future
        finally:
            self.pending.pop(rid, None)
        if status == "error":
            raise value
        return value

    def data_received(self, data: bytes) -> None:
        self.inbox += data
        head = _FROM_DECODER.size
        while len(self.inbox) >= head:
            rid, length = _FROM_DECODER.unpack_from(self.inbox)
            if len(self.inbox) < head + length:
                break
            with memoryview(self.inbox) as view, view[head : head + length] as part:
                value = pickle.loads(part)
            del self.inbox[: head + length]
            future = self.pending.get(rid)
            if future is not None and not future.done():
                future.set_result(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(_DecoderLostError())
        self.owner.lost(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def run_decoder(sock: socket.socket, title: str) -> None:
    """The decoder process: assemble each body from its chunks, decode, answer."""
    die_with_parent()
    set_title(title)
    reader = sock.makefile("rb", buffering=1 << 20)
    bodies: dict[int, list[bytes]] = {}
    head = _TO_DECODER.size
    while True:
        frame = reader.read(head)
        if len(frame) < head:
            return  # the API server is gone
        rid, kind, length = _TO_DECODER.unpack(frame)
        payload = reader.read(length)
        if kind == _CHUNK:
            bodies.setdefault(rid, []).append(payload)
        elif kind == _DROP:
            bodies.pop(rid, None)
        else:
            raw = b"".join(bodies.pop(rid, []))
            try:
                result: tuple[str, Any] = ("ok", decode(raw, *pickle.loads(payload)))
            except APIError as exc:
                result = ("error", exc)
            data = pickle.dumps(result)
            with contextlib.suppress(OSError):
                sock.sendall(_FROM_DECODER.pack(rid, len(data)) + data)
