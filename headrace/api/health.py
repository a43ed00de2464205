"""Probes, per the lifecycle table of DESIGN §4.

/health        vLLM-compatible: 200 when ready or degraded (some engines restarting)
/health/live   liveness: 200 unless failed (loading, restarting or draining are alive)
/health/ready  readiness: as /health; the 503 body carries loading progress
/load          vLLM's: {"server_load": requests in flight}
Every 503 carries Retry-After and a JSON body naming the state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from headrace.api.context import RETRY_AFTER_S, ServerContext, ServerState
from headrace.api.validation import context_of
from headrace.metrics.prometheus import CONTENT_TYPE

router = APIRouter()


def _body(ctx: ServerContext) -> dict[str, Any]:
    state = ctx.state
    body: dict[str, Any] = {"status": state.value}
    if state is ServerState.LOADING:
        body["progress"] = ctx.load_progress()
    elif state is ServerState.FAILED:
        body["error"] = ctx.failure
    if state in (ServerState.DEGRADED, ServerState.RESTARTING, ServerState.FAILED):
        body["engines"] = ctx.engine_states()
    return body


def _answer(ctx: ServerContext, ok: bool) -> JSONResponse:
    if ok:
        return JSONResponse(_body(ctx))
    return JSONResponse(_body(ctx), status_code=503, headers={"Retry-After": RETRY_AFTER_S})


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ctx = context_of(request)
    return _answer(ctx, ctx.state.serving)


@router.get("/health/live")
async def live(request: Request) -> JSONResponse:
    ctx = context_of(request)
    return _answer(ctx, ctx.state is not ServerState.FAILED)


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    ctx = context_of(request)
    return _answer(ctx, ctx.state.serving)


@router.get("/load")
async def load(request: Request) -> JSONResponse:
    """vLLM's server-load endpoint (what `--enable-server-load-tracking` turns on there; always
    on here): the requests in flight, counted as choices, across every API server."""
    return JSONResponse({"server_load": context_of(request).admission.board.in_flight()})


def metrics_body(ctx: ServerContext, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The /metrics exposition for a request with these (lower-cased) headers, 200 in every
    state. `Cache-Control: no-cache` skips the counter/histogram snapshot (at most 1 s old
    otherwise); the gauges routers read are always current."""
    fresh = any(k == b"cache-control" and b"no-cache" in v for k, v in headers)
    ctx.metrics.set_lifecycle(ctx.state.value, ctx.load_fraction)
    return ctx.metrics.exposition(fresh)


class MetricsEndpoint:
    """GET /metrics, answered before FastAPI's routing and middleware: routers scrape it at
    20 Hz, so it skips everything a scrape does not need. The API server's HTTP protocol
    (`fast_metrics`) answers most scrapes before they reach ASGI at all; this serves the
    rest (`/metrics?...`, other HTTP implementations)."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        self.headers = [(b"content-type", CONTENT_TYPE.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        body = metrics_body(self.ctx, scope["headers"])
        headers = [*self.headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
