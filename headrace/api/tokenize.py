"""POST /tokenize and /detokenize (vLLM's shapes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from headrace.api.body import parse_body
from headrace.api.errors import APIError
from headrace.api.protocol import DetokenizeRequest, TokenizeRequest
from headrace.api.validation import context_of, require_json
from headrace.frontend.tokenize import PromptLimits, PromptTooLongError

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(require_json)])
async def tokenize(request: Request) -> JSONResponse:
    body = await parse_body(request, TokenizeRequest)
    ctx = context_of(request)
    ctx.check_model(body.model)
    tok = ctx.require_serving()
    max_len = ctx.client.max_model_len
    # Counting only: the limit is loose (a prompt may be longer than the window), but bounded.
    limits = PromptLimits(max_model_len=max(max_len * 64, 1 << 20), max_tokens=0)
    if body.messages is not None:
        messages = [m.as_template_input() for m in body.messages]
        try:
            text = await tok.render_chat(messages, body.add_generation_prompt)
        except Exception as exc:  # jinja / template errors: these messages cannot be rendered
            raise APIError(
                400, f"the chat template could not render these messages: {exc}", param="messages"
            ) from None
        add_special = False
    else:
        text, add_special = body.prompt or "", body.add_special_tokens
    try:
        ids = await tok.encode_prompt(text, limits, add_special)
    except PromptTooLongError as exc:
        raise APIError(400, str(exc)) from None
    return JSONResponse({"count": len(ids), "max_model_len": max_len, "tokens": ids})


@router.post("/detokenize", dependencies=[Depends(require_json)])
async def detokenize(request: Request) -> JSONResponse:
    body = await parse_body(request, DetokenizeRequest)
    ctx = context_of(request)
    ctx.check_model(body.model)
    tok = ctx.require_serving()
    if any(not 0 <= t < tok.vocab_size for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {tok.vocab_size})", param="tokens")
    return JSONResponse({"prompt": await tok.decode(body.tokens, skip_special_tokens=False)})
