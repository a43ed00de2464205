"""The API server's stop sequence (DESIGN §4): SIGTERM or SIGINT starts a drain, not an exit.

1. `draining`: readiness and /health turn 503 at once, new inference gets 503, while the port
   stays open so probes and /metrics keep answering.
2. In-flight requests get up to `shutdown_timeout` seconds to finish.
3. Whatever is left is ended with finish_reason `abort` (and aborted in the engines).
4. uvicorn then closes the port and waits for the last responses to flush (5 s at most).
A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from headrace.api.context import ServerContext

logger = logging.getLogger("headrace.api")

_POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """uvicorn, with signals turned into a drain of `ctx` before the usual graceful exit."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's _captured_signals: the process exits 0 after the drain
        # instead of re-raising the signal.
        if self._loop is None or self._drain is not None:
            logger.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        logger.info(
            "%s: draining (up to %.0f s)",
            signal.Signals(sig).name,
            self.ctx.config.shutdown_timeout,
        )
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        ctx = self.ctx
        ctx.draining = True
        deadline = time.monotonic() + ctx.config.shutdown_timeout
        while ctx.client.output.seqs and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        aborted = ctx.client.abort_all()
        if aborted:
            logger.warning("shutdown timeout: aborted %d unfinished requests", aborted)
        # uvicorn's own shutdown then waits (timeout_graceful_shutdown) for the responses that
        # just ended to write their last events.
        self.should_exit = True
