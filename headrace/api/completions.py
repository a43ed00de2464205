"""POST /v1/completions: text or token-id prompts (one or a batch), JSON or SSE."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from headrace.api.body import parse_body
from headrace.api.errors import APIError
from headrace.api.protocol import CompletionRequest
from headrace.api.responses import Answer
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
    explicit_max = body.max_tokens if "max_tokens" in body.model_fields_set else None
    limits = prompt_limits(ctx, explicit_max, body.truncate_prompt_tokens)
    params = sampling_params(body, body.max_tokens, body.logprobs, tok.vocab_size)
    await check_constraint(params, body)
    with ctx.admission.admit(body.n * body.num_prompts):
        prompts, texts = await _tokenize(tok, body, limits)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await start(ctx, request_id, prompts, params, arrival, pinned)
    answer = Answer(request_id, model, "text_completion", "text_completion")
    n = body.n
    echo = {i: texts[i // n] for i in range(len(prompts) * n)} if body.echo else {}
    offsets: dict[int, int] = {}

    def choice_json(c: Choice) -> dict[str, Any]:
        logprobs = _logprobs(tok, c.logprobs, 0) if c.logprobs else None
        return _choice(c.index, echo.get(c.index, "") + c.text, logprobs, c)

    def delta_json(d: SeqDelta) -> dict[str, Any]:
        logprobs = None
        if d.logprobs:
            logprobs = _logprobs(tok, d.logprobs, offsets.get(d.index, 0))
            offsets[d.index] = offsets.get(d.index, 0) + sum(len(t) for t in logprobs["tokens"])
        return _choice(d.index, echo.pop(d.index, "") + d.text, logprobs, d)

    return await answer.respond(
        request, ctx, stream, body.stream, body.include_usage, choice_json, delta_json
    )


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


def _logprobs(tok: FrontendTokenizer, items: list[TokenLogprobs], offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in items:
        text = tok.token_text(lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top.append({tok.token_text(t): v for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }
