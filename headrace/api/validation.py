"""Checks shared by the inference routes, run before any work is queued."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from fastapi import Request

from headrace.api.context import ServerContext
from headrace.api.errors import APIError
from headrace.api.protocol import NO_DEFAULTS, SamplingFields
from headrace.config import SamplingDefaults
from headrace.engine import structured
from headrace.frontend.output import EngineError, RequestStream
from headrace.frontend.tokenize import FrontendTokenizer, PromptLimits
from headrace.wire.messages import SamplingParams

logger = logging.getLogger("headrace.api")


def context_of(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


async def require_json(request: Request) -> None:
    """400 unless the body is declared as JSON (FastAPI would otherwise guess)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(
            400, f"Content-Type must be application/json, got {content_type or 'none'!r}"
        )


async def sampling_params(
    body: SamplingFields,
    tok: FrontendTokenizer,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    defaults: SamplingDefaults = NO_DEFAULTS,
) -> SamplingParams:
    """The wire params (bad words tokenized; fields left out take the model's `defaults`), or
    400: checked before any work is queued."""
    try:
        params = body.sampling_params(max_tokens, logprobs, prompt_logprobs, defaults)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    if params.bad_words:
        words = await tok.bad_words(params.bad_words)
        params = msgspec.structs.replace(params, bad_words_token_ids=words)
    try:
        params.check_token_ids(tok.vocab_size)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return params


async def check_constraint(
    params: SamplingParams, body: SamplingFields, from_tools: bool = False
) -> None:
    """400 naming what is wrong with a bad schema, regex, grammar or structural tag, and the
    field that gave it (checked on a worker thread: a large schema takes milliseconds)."""
    spec = params.structured_outputs
    if spec is None:
        return
    try:
        await asyncio.to_thread(structured.check_constraint, spec)
    except ValueError as exc:
        found = None if from_tools else body.constraint()
        field = "tools" if from_tools else found[0] if found else "structured_outputs"
        raise APIError(400, f"{field}: {exc}", param=field) from None
    except RuntimeError as exc:  # xgrammar is not installed
        raise APIError(500, str(exc)) from None


def prompt_limits(ctx: ServerContext, max_tokens: int | None, truncate: int | None) -> PromptLimits:
    """What the prompt must fit; 400 for a truncation longer than the context window (vLLM's)."""
    max_len = ctx.client.max_model_len
    if truncate is not None and truncate > max_len:
        raise APIError(
            400,
            f"truncate_prompt_tokens ({truncate}) is greater than the context length "
            f"({max_len}); choose a smaller truncation size",
            param="truncate_prompt_tokens",
        )
    return PromptLimits(max_len, max_tokens, truncate)


RANK_HEADER = "x-data-parallel-rank"


def pinned_rank(ctx: ServerContext, request: Request, field: int | None) -> int | None:
    """The data-parallel rank the request pins (vLLM's `X-data-parallel-rank` header or the
    `data_parallel_rank` body field), or None; 400 if it is not a rank of this server."""
    header = request.headers.get(RANK_HEADER)
    param = "data_parallel_rank"
    if header is not None:
        try:
            from_header = int(header.strip())
        except ValueError:
            raise APIError(
                400, f"X-data-parallel-rank must be an integer, got {header!r}", param=param
            ) from None
        if field is not None and field != from_header:
            raise APIError(
                400,
                f"X-data-parallel-rank {from_header} and data_parallel_rank {field} disagree",
                param=param,
            )
        field = from_header
    if field is None:
        return None
    size = len(ctx.client.engines)
    if not 0 <= field < size:
        raise APIError(
            400,
            f"data-parallel rank {field} is out of range: this server has ranks 0..{size - 1}",
            param=param,
        )
    return field


async def start(
    ctx: ServerContext,
    request_id: str,
    prompts: list[list[int]],
    params: SamplingParams,
    arrival_time: float,
    pinned: int | None = None,
) -> RequestStream:
    """Queue the request in the engines (on rank `pinned` if given); 503 if none can take it."""
    if not ctx.config.disable_log_requests:
        logger.info(
            "request %s: %d prompt tokens, %s",
            request_id, sum(len(p) for p in prompts), msgspec.json.encode(params).decode(),
        )  # fmt: skip
    try:
        stream = await ctx.client.add(request_id, prompts, params, arrival_time, pinned)
    except EngineError as exc:
        raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None
    ctx.metrics.request_params(stream.seqs[0].engine_index, params.n)
    return stream
