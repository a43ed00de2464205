"""POST /v1/completions: text or token-id prompts (one or a batch), JSON or SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from headrace.api.answer import Answer, prompt_logprobs_json
from headrace.api.body import parse_body
from headrace.api.errors import APIError
from headrace.api.protocol import CompletionRequest
from headrace.api.validation import (
    check_constraint,
    context_of,
    pinned_rank,
    prompt_limits,
    require_json,
    sampling_params,
    start,
)
from headrace.frontend.output import Choice, SeqDelta
from headrace.frontend.tokenize import FrontendTokenizer, PromptLimits
from headrace.wire.messages import TokenLogprobs

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(require_json)])
async def create_completion(request: Request) -> Response:
    """1. decode + validate off the loop 2. tokenize off the loop 3. send to the engines
    4. answer."""
    arrival = time.monotonic()
    body = await parse_body(request, CompletionRequest)
    ctx = context_of(request)
    model = ctx.check_model(body.model)
    tok = ctx.require_serving()
    pinned = pinned_rank(ctx, request, body.data_parallel_rank)
    # max_tokens 0 with echo: the engine computes one token (the prompt's logprobs come with
    # it) and the answer leaves it out, as vLLM's does
    max_tokens = 1 if body.echo_only else body.max_tokens
    explicit_max = max_tokens if "max_tokens" in body.model_fields_set else None
    limits = prompt_limits(ctx, explicit_max, body.truncate_prompt_tokens)
    params = await sampling_params(
        body, tok, max_tokens, body.logprobs, body.wanted_prompt_logprobs,
        ctx.config.sampling_defaults,
    )  # fmt: skip
    await check_constraint(params, body)
    with ctx.admission.admit(body.n * body.num_prompts):
        prompts, texts = await _tokenize(tok, body, limits)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await start(ctx, request_id, prompts, params, arrival, pinned)
    answer = Answer(
        request_id, model, "text_completion", "text_completion", prompt_only=body.echo_only
    )
    n = body.n
    echo = {i: texts[i // n] for i in range(len(prompts) * n)} if body.echo else {}
    scored = body.echo and body.logprobs is not None  # the prompt's tokens lead the logprobs
    name = body.token_namer(tok.token_text)
    offsets: dict[int, int] = {}
    unannounced = set(range(len(prompts) * n))  # streamed choices yet to send prompt_token_ids

    def text_and_logprobs(
        c: Choice | SeqDelta, logprobs: list[TokenLogprobs] | None, echoed: str | None
    ) -> tuple[str, dict[str, Any] | None]:
        text = "" if body.echo_only else c.text
        generated = [] if body.echo_only else (logprobs or [])
        if echoed is None or not scored:  # no prompt part (or it went out already)
            out = _logprobs(name, generated, offsets.get(c.index, 0)) if logprobs else None
        else:
            prompt = prompts[c.index // n]
            out = _logprobs(name, generated, 0, prompt, c.prompt_logprobs or [])
        if out is not None and out["tokens"]:
            offsets[c.index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return (echoed or "") + text, out

    def choice_json(c: Choice) -> dict[str, Any]:
        text, logprobs = text_and_logprobs(c, c.logprobs, echo.get(c.index))
        out = _choice(c.index, text, logprobs, c)
        if body.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_json(name, prompts[c.index // n], c)
        if body.return_token_ids:
            out["prompt_token_ids"] = prompts[c.index // n]
            out["token_ids"] = [] if body.echo_only else c.token_ids
        return out

    def delta_json(d: SeqDelta) -> dict[str, Any]:
        text, logprobs = text_and_logprobs(d, d.logprobs, echo.pop(d.index, None))
        out = _choice(d.index, text, logprobs, d)
        if body.return_token_ids:  # vLLM's: the prompt's ids in a choice's first chunk only
            if d.index in unannounced:
                unannounced.discard(d.index)
                out["prompt_token_ids"] = prompts[d.index // n]
            out["token_ids"] = [] if body.echo_only else d.token_ids
        return out

    return await answer.respond(
        request, ctx, stream, body.stream, body.include_usage, choice_json, delta_json,
        continuous_usage=body.continuous_usage,
    )  # fmt: skip


async def _tokenize(
    tok: FrontendTokenizer, body: CompletionRequest, limits: PromptLimits
) -> tuple[list[list[int]], list[str]]:
    raw = body.prompt
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and isinstance(raw[0], int):
        items = [[int(t) for t in raw if isinstance(t, int)]]
    else:
        items = [p for p in raw if isinstance(p, str | list)]
    prompts: list[list[int]] = []
    texts: list[str] = []
    try:
        for item in items:
            if isinstance(item, str):
                prompts.append(await tok.encode_prompt(item, limits, body.add_special_tokens))
                texts.append(item)
            else:
                prompts.append(tok.check_ids(item, limits))
                texts.append(await tok.decode(item) if body.echo else "")
    except ValueError as exc:  # PromptTooLongError included
        raise APIError(400, str(exc), param="prompt") from None
    if not all(prompts):  # a text of which the tokenizer made no token
        raise APIError(400, "the prompt is empty once tokenized", param="prompt")
    return prompts, texts


def _choice(
    index: int, text: str, logprobs: dict[str, Any] | None, end: Choice | SeqDelta
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": end.finish_reason,
        "stop_reason": end.stop_reason,
    }


def _logprobs(
    name: Callable[[int], str],
    items: list[TokenLogprobs],
    offset: int,
    prompt: list[int] | None = None,
    prompt_logprobs: list[TokenLogprobs] | None = None,
) -> dict[str, Any]:
    """The legacy completions logprobs object, tokens as `name` gives them; with `prompt`
    (echo), the prompt's tokens first, the first of them with no logprob (nothing predicts
    it)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []

    def put(token_id: int, lp: TokenLogprobs | None) -> None:
        nonlocal offset
        text = name(token_id)
        tokens.append(text)
        token_logprobs.append(None if lp is None else lp.logprob)
        top.append(None if lp is None else _top(name, lp))
        offsets.append(offset)
        offset += len(text)

    if prompt is not None:
        put(prompt[0], None)
        for lp in prompt_logprobs or []:
            put(lp.token_id, lp)
    for lp in items:
        put(lp.token_id, lp)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _top(name: Callable[[int], str], lp: TokenLogprobs) -> dict[str, float]:
    return {name(t): v for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
