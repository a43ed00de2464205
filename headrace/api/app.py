"""The API-server process: FastAPI app, ASGI middleware, and `run_api_server` (its one loop)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import uvicorn
import uvloop
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from headrace.api import chat, completions, health, models, responses, tokenize
from headrace.api.admission import DRAIN_SAMPLE_PERIOD_S, Admission
from headrace.api.body import BodyDecoder
from headrace.api.context import ServerContext
from headrace.api.errors import error_body, install_error_handlers
from headrace.api.fast_metrics import MetricsFastPathProtocol
from headrace.api.lifecycle import DrainingServer
from headrace.api.openapi import install_openapi
from headrace.config import ServerConfig
from headrace.frontend.client import EngineClient
from headrace.frontend.queue_board import QueueBoard, QueueRow
from headrace.frontend.tokenize import FrontendTokenizer
from headrace.metrics.http import HttpMetrics, HttpMetricsMiddleware
from headrace.metrics.prometheus import MetricsConfig, ServerMetrics
from headrace.metrics.stats import StatsLogger
from headrace.process import die_with_parent, set_title, setup_logging
from headrace.supervise import EngineBoard
from headrace.wire.sockets import Addresses

logger = logging.getLogger("headrace.api")


@dataclass(frozen=True, slots=True)
class ApiServerArgs:
    """Everything one API-server process is started with."""

    config: ServerConfig
    api_index: int
    addresses: Addresses
    board: EngineBoard  # each rank's pid and restart status, shared with the launcher
    queues: QueueBoard  # every API server's queued choices and tokens (admission control)
    restarted: bool = False  # a replacement: accepts once it can serve, past the first load


def build_app(ctx: ServerContext) -> ASGIApp:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.client.start()
        await ctx.bodies.start()
        tasks = [
            asyncio.create_task(_load_tokenizer(ctx)),
            asyncio.create_task(_watch_loop_lag(ctx)),
        ]
        if ctx.stats_logger is not None:
            tasks.append(asyncio.create_task(_log_stats(ctx)))
        if ctx.admission.enabled:
            tasks.append(asyncio.create_task(_sample_drain_rate(ctx)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await ctx.client.close()
            ctx.bodies.shutdown()
            if ctx.tokenizer is not None:
                ctx.tokenizer.shutdown()

    docs: dict[str, Any] = {}
    if ctx.config.disable_fastapi_docs:  # vLLM's flag: the schema and both UIs off
        docs = {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title="headrace", version=_version(), lifespan=lifespan, **docs)
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (health, models, tokenize, completions, chat, responses):
        app.include_router(module.router)
    install_openapi(app, ctx)
    app.add_middleware(GuardMiddleware, ctx=ctx)
    # outside the guard: a browser's preflight carries no API key, and answers it needs (a 401
    # included) get the CORS headers that let it read them (vLLM's defaults: anyone, anything)
    cfg = ctx.config
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cfg.allowed_origins),
        allow_credentials=cfg.allow_credentials,
        allow_methods=list(cfg.allowed_methods),
        allow_headers=list(cfg.allowed_headers),
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(ctx.metrics.registry))
    # /metrics is answered in front of FastAPI itself, not as one of its middlewares: FastAPI
    # wraps those in its own (error page, telemetry, body limit), and at a router's 20 Hz that
    # stack was about half of a scrape's CPU.
    return health.MetricsEndpoint(app, ctx)


_LAG_PERIOD_S = 0.25
SWITCH_INTERVAL_S = 0.001


async def _watch_loop_lag(ctx: ServerContext) -> None:
    """How late a timer fires is the event loop's own measure of responsiveness."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(_LAG_PERIOD_S)
        ctx.metrics.observe_loop_lag(max(0.0, loop.time() - start - _LAG_PERIOD_S))


async def _sample_drain_rate(ctx: ServerContext) -> None:
    """Retry-After needs how fast the queues drain: sampled here, so it is known at once."""
    while True:
        ctx.admission.drain.sample()
        await asyncio.sleep(DRAIN_SAMPLE_PERIOD_S)


async def _log_stats(ctx: ServerContext) -> None:
    assert ctx.stats_logger is not None
    while True:
        await asyncio.sleep(ctx.config.log_stats_interval)
        if ctx.state.value in ("ready", "degraded", "restarting", "draining"):
            ctx.stats_logger.log()


_RESTART_READY_TIMEOUT_S = 120.0


async def _until_serving(
    ctx: ServerContext,
    also: Callable[[], bool] = lambda: True,
    timeout: float | None = _RESTART_READY_TIMEOUT_S,
    joined: str = "is back",
) -> None:
    """A restarted API server shares the port with live ones: while it loads its tokenizer and
    hears from the engines, they take the connections; it joins once it can serve and `also`
    holds (or it fails, or after `timeout`, to report what it is then). At start-up, API
    servers past the first wait so too, until API server 0 has served: before, API server 0
    alone answers (503 while loading), so a probe's "ready" is never followed by a 503 from a
    sibling still loading. So does API server 0's replacement while no server has yet served:
    waiting would leave nobody to answer probes until the model is in."""
    ctx.client.start()
    await _load_tokenizer(ctx)
    deadline = None if timeout is None else time.monotonic() + timeout
    while (
        not (ctx.state.serving and also())
        and ctx.state.value not in ("failed", "draining")
        and (deadline is None or time.monotonic() < deadline)
    ):
        await asyncio.sleep(0.05)
    logger.info("API server %d %s: %s", ctx.client.api_index, joined, ctx.state.value)


async def _mark_served(ctx: ServerContext, row: QueueRow) -> None:
    """Say on the board when this server first can serve (API servers past the first wait)."""
    while not ctx.state.serving:
        await asyncio.sleep(0.05)
    row.served()


def _version() -> str:
    import headrace

    return headrace.__version__


async def _load_tokenizer(ctx: ServerContext) -> None:
    if ctx.tokenizer is not None:
        return
    try:
        tok = await FrontendTokenizer.load(ctx.config.model, ctx.config.chat_template)
    except Exception as exc:
        logger.exception("tokenizer failed to load")
        ctx.tokenizer_error = f"{type(exc).__name__}: {exc}"
        return
    ctx.client.tokenizer = tok.backend
    ctx.tokenizer = tok
    longest = tok.max_token_chars
    logger.log(ctx.client.news_level, "tokenizer loaded (longest token: %d characters)", longest)


class _BodyTooLargeError(Exception):
    pass


class _BodyTimeoutError(Exception):
    pass


# A body must keep coming (a slow client holds a connection and a task, not the loop) and
# be complete within a deadline: slowloris bodies are cut off with 408.
BODY_IDLE_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0


class GuardMiddleware:
    """Before any route: API key on /v1/*, request-body size and time caps, X-Request-Id echo.

    Plain ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass untouched.
    """

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        key = ctx.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None
        self.limit = ctx.config.max_request_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id") or uuid.uuid4().hex.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        if self.expected is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _reply(
                    send_with_id, 401, "Invalid or missing API key (use Authorization: Bearer)"
                )
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _reply(send_with_id, 413, self._too_large())
            return
        received = 0
        body_done = False
        deadline = time.monotonic() + BODY_TIMEOUT_S

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # from here on the app only listens for a disconnect
                return await receive()
            wait = min(BODY_IDLE_TIMEOUT_S, deadline - time.monotonic())
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeoutError from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeError
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, counting_receive, send_with_id)
        except _BodyTooLargeError:
            if not started:
                await _reply(send_with_id, 413, self._too_large())
        except _BodyTimeoutError:
            if not started:
                message = (
                    f"The request body did not arrive in time (a pause over "
                    f"{BODY_IDLE_TIMEOUT_S:g} s, or over {BODY_TIMEOUT_S:g} s in all)"
                )
                await _reply(send_with_id, 408, message)

    def _too_large(self) -> str:
        return f"The request body is larger than the limit of {self.limit} bytes"


async def _reply(send: Send, status: int, message: str) -> None:
    body = msgspec.json.encode(error_body(status, message))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (408, 413):  # the rest of the body is not read: this connection is done
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _AccessLogFilter(logging.Filter):
    """Drops uvicorn access-log lines for the paths named in --disable-access-log-for-endpoints."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        super().__init__()
        self.paths = set(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3:
            path = str(args[2]).split("?")[0]
            return path not in self.paths
        return True


def run_api_server(args: ApiServerArgs, sock: socket.socket) -> None:
    """Entry point of an API-server process (spawned by the launcher with the bound socket)."""
    cfg = args.config
    setup_logging()
    die_with_parent()
    set_title(f"ApiServer_{args.api_index}")
    # The loop gets the GIL back within 1 ms (not 5) of asking, from the tokenizer thread and
    # the body decoder's feeder threads (benchmarks/flood.py: /health p99 under the flood
    # 43-78 ms with 1 ms, 55-136 ms with 5).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if args.api_index > 0:  # uvicorn's start-up lines once, from API server 0
        logging.getLogger("uvicorn.error").addFilter(lambda r: r.levelno >= logging.WARNING)
    if cfg.disable_access_log_for_endpoints:
        logging.getLogger("uvicorn.access").addFilter(
            _AccessLogFilter(cfg.disable_access_log_for_endpoints)
        )

    async def serve() -> None:
        client = EngineClient(
            args.addresses,
            args.api_index,
            args.board,
            cfg.engine_stall_timeout,
            args.queues.row(args.api_index),
        )
        metrics = ServerMetrics(
            MetricsConfig(
                cfg.served_model_names[0],
                args.board.num_ranks,
                cfg.metrics_namespace,
                args.api_index,
            )
        )
        client.on_stats.append(metrics.record_step)
        client.on_ready.append(lambda msg: metrics.engine_ready(msg, cfg.enable_prefix_caching))
        client.output.observer = metrics
        admission = Admission(
            args.queues,
            args.api_index,
            cfg.max_num_queued_reqs,
            cfg.max_num_queued_tokens,
            metrics.admission_rejected,
        )
        bodies = BodyDecoder(args.api_index)
        ctx = ServerContext(cfg, client, metrics, admission, bodies, started=time.time())
        if not cfg.disable_log_stats and args.api_index == 0:
            ctx.stats_logger = StatsLogger(args.board.num_ranks)
            client.on_stats.append(ctx.stats_logger.record)
        app = build_app(ctx)
        config = uvicorn.Config(
            app,
            log_level=cfg.uvicorn_log_level,
            access_log=not cfg.disable_uvicorn_access_log,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=5,
            log_config=None,
            http=MetricsFastPathProtocol.for_context(ctx),
        )
        marking = asyncio.create_task(_mark_served(ctx, args.queues.row(args.api_index)))
        if args.restarted and args.queues.any_served():
            await _until_serving(ctx)
        elif args.api_index > 0:
            await _until_serving(
                ctx, lambda: args.queues.has_served(0), timeout=None, joined="takes connections"
            )
        try:
            await DrainingServer(config, ctx).serve(sockets=[sock])
        finally:
            marking.cancel()

    # uvloop, as uvicorn picks by itself when it owns the loop: it does not here, the
    # server runs inside our coroutine next to the engine client.
    uvloop.run(serve())
