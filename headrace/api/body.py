"""Request bodies decoded and validated away from the event loop's GIL.

A 300,000-word prompt is a 2 MB JSON string. FastAPI decodes and validates a declared body on the
event loop (17 ms for two such prompts); sixty such requests at once held `/health` for 200-330
ms (benchmarks/flood.py). A thread does not help: decoding is one C call that holds the GIL for
its whole length, and the loop waits for the GIL after every poll. So a body over
`INLINE_BYTES` is decoded in a helper process (`headrace::BodyDecoder_<i>`, one per API server):
msgspec decodes it and pydantic validates it there, and the validated request comes back pickled
(a 2 MB string unpickles in a fraction of a millisecond, on the executor's own thread).

Smaller bodies are decoded inline, which is cheaper than the trip. A decoder process that dies
is reported and replaced; the request it had is decoded on a thread meanwhile.

Errors are the 400s FastAPI's validation gave (`errors.validation_message`): bad JSON, nesting
too deep, numbers out of range, and every field error with its path.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import msgspec
from fastapi import Request
from pydantic import BaseModel, ValidationError

from headrace.api.errors import APIError, validation_message
from headrace.process import die_with_parent, set_title

logger = logging.getLogger("headrace.api")

INLINE_BYTES = 64 << 10  # smaller bodies: cheaper to decode here than to send away

M = TypeVar("M", bound=BaseModel)


def decode(raw: bytes, model: type[M]) -> M:
    """JSON bytes -> a validated `model`, or APIError 400."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON (nested too deeply)") from None
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise APIError(400, message, param) from None


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's JSON body as a validated `model` (the route's first step)."""
    bodies: BodyDecoder = request.app.state.ctx.bodies
    return await bodies.decode(await request.body(), model)


def _start_worker(title: str) -> None:
    die_with_parent()
    set_title(title)


class BodyDecoder:
    """Decodes request bodies: small ones inline, large ones in the helper process."""

    def __init__(self, api_index: int) -> None:
        self.title = f"BodyDecoder_{api_index}"
        self._pool: Executor | None = None
        self._fallback = ThreadPoolExecutor(max_workers=1, thread_name_prefix="body-decoder")

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(1, ctx, initializer=_start_worker, initargs=(self.title,))
        pool.submit(int)  # start the process now, not on the first large body
        self._pool = pool

    async def decode(self, raw: bytes, model: type[M]) -> M:
        if len(raw) <= INLINE_BYTES:
            return decode(raw, model)
        loop = asyncio.get_running_loop()
        pool = self._pool
        if pool is not None:
            try:
                return await loop.run_in_executor(pool, decode, raw, model)
            except BrokenProcessPool:
                self._replace(pool)
        return await loop.run_in_executor(self._fallback, decode, raw, model)

    def _replace(self, broken: Executor) -> None:
        if self._pool is not broken:  # another request replaced it already
            return
        logger.error("the body decoder process died; starting a new one")
        broken.shutdown(wait=False, cancel_futures=True)
        self.start()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._fallback.shutdown(wait=False, cancel_futures=True)
