"""GET /v1/models and /version."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import headrace
from headrace.api.context import RETRY_AFTER_S, ServerState
from headrace.api.errors import error_response
from headrace.api.validation import context_of

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """llm-d and vLLM-style readiness checks read this: 503 until the model can serve, and
    again while no engine serves (restarting) or once failed; still 200 while draining
    (in-flight work is being finished) and while degraded."""
    ctx = context_of(request)
    state = ctx.state
    refusals = {
        ServerState.LOADING: "the model is still loading",
        ServerState.RESTARTING: "no engine is serving: restarting",
        ServerState.FAILED: str(ctx.failure),
    }
    if state in refusals:
        return error_response(503, refusals[state], headers={"Retry-After": RETRY_AFTER_S})
    created = int(ctx.started or time.time())
    max_len = ctx.client.max_model_len
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "headrace",
            "root": ctx.config.model or ctx.config.served_model_names[0],
            "parent": None,
            "max_model_len": max_len,
        }
        for name in ctx.config.served_model_names
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": headrace.__version__})
