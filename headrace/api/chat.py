"""POST /v1/chat/completions: render the chat template, then generate; JSON or SSE."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from headrace.api.body import parse_body
from headrace.api.errors import APIError
from headrace.api.protocol import ChatCompletionRequest
from headrace.api.streaming import collect, sse_response, usage
from headrace.api.validation import (
    context_of,
    pinned_rank,
    prompt_limits,
    require_json,
    sampling_params,
    start,
)
from headrace.frontend.output import SeqDelta
from headrace.frontend.tokenize import FrontendTokenizer, PromptLimits, PromptTooLongError
from headrace.wire.messages import TokenLogprobs

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_json)])
async def create_chat_completion(request: Request) -> Response:
    """1. decode + validate off the loop 2. template + tokenize off the loop 3. send to the
    engines 4. answer."""
    arrival = time.monotonic()
    body = await parse_body(request, ChatCompletionRequest)
    ctx = context_of(request)
    model = ctx.check_model(body.model)
    tok = ctx.require_serving()
    pinned = pinned_rank(ctx, request, body.data_parallel_rank)
    max_tokens = body.requested_max_tokens
    limits = prompt_limits(ctx, max_tokens, body.truncate_prompt_tokens)
    params = sampling_params(body, max_tokens, body.num_logprobs)
    with ctx.admission.admit(body.n):
        prompt = await _render(tok, body, limits)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await start(ctx, request_id, [prompt], params, arrival, pinned)
    stream.streaming = body.stream
    base = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
    }
    echo = ""
    if body.echo and body.messages[-1].role == "assistant":
        echo = body.messages[-1].as_template_input()["content"]

    if not body.stream:
        choices = await collect(request, ctx.client, stream)
        return JSONResponse(
            {
                **base,
                "choices": [
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": echo + c.text},
                        "logprobs": _logprobs(tok, c.logprobs) if body.logprobs else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                    for c in choices
                ],
                "usage": usage(stream, sum(len(c.token_ids) for c in choices)),
            }
        )

    chunk_base = {**base, "object": "chat.completion.chunk"}
    first = [
        {
            **chunk_base,
            "choices": [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": echo},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        for i in range(body.n)
    ]
    counted = [0]

    def chunk_for(d: SeqDelta) -> list[dict[str, Any]]:
        counted[0] += len(d.token_ids)
        choice = {
            "index": d.index,
            "delta": {"content": d.text} if d.text or d.finish_reason is None else {},
            "logprobs": _logprobs(tok, d.logprobs) if d.logprobs else None,
            "finish_reason": d.finish_reason,
            "stop_reason": d.stop_reason,
        }
        return [{**chunk_base, "choices": [choice]}]

    def final_chunks() -> list[dict[str, Any]]:
        if not body.include_usage:
            return []
        return [{**chunk_base, "choices": [], "usage": usage(stream, counted[0])}]

    return sse_response(ctx.client, stream, chunk_for, final_chunks, first)


async def _render(
    tok: FrontendTokenizer, body: ChatCompletionRequest, limits: PromptLimits
) -> list[int]:
    messages = [m.as_template_input() for m in body.messages]
    try:
        text = await tok.render_chat(
            messages,
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
        )
    except Exception as exc:  # jinja errors: the template refused these messages
        raise APIError(400, f"the chat template could not render these messages: {exc}") from None
    try:
        return await tok.encode_prompt(text, limits, body.add_special_tokens)
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param="messages") from None


def _logprobs(tok: FrontendTokenizer, items: list[TokenLogprobs]) -> dict[str, Any]:
    """The chat logprobs object: one entry per token, each with its top alternatives."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for lp in items:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [
            entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
        content.append(item)
    return {"content": content}
