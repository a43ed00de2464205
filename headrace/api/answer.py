"""The shape both inference routes answer in: one JSON body, or SSE chunks and usage.

A route supplies only what differs: how a finished `Choice` reads (`choice_json`) and how a
streamed `SeqDelta` reads (`delta_json`, which may return None to send nothing yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from headrace.api.context import ServerContext
from headrace.api.streaming import collect, sse_response, usage
from headrace.frontend.output import Choice, RequestStream, SeqDelta


@dataclass(slots=True)
class Answer:
    """One API request's answer: `object` names the JSON body, `chunk_object` each SSE chunk."""

    request_id: str
    model: str
    object: str
    chunk_object: str
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_only: bool = False  # echo with max_tokens 0: the one token computed is not answered

    def base(self, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": self.chunk_object if chunk else self.object,
            "created": self.created,
            "model": self.model,
        }

    def _completion_tokens(self, token_ids: Iterable[list[int]]) -> int:
        return 0 if self.prompt_only else sum(len(t) for t in token_ids)

    async def respond(
        self,
        request: Request,
        ctx: ServerContext,
        stream: RequestStream,
        streaming: bool,
        include_usage: bool,
        choice_json: Callable[[Choice], dict[str, Any]],
        delta_json: Callable[[SeqDelta], dict[str, Any] | None],
        first_choices: list[dict[str, Any]] | None = None,
        body_extra: Callable[[list[Choice]], dict[str, Any]] | None = None,
        first_fields: dict[str, Any] | None = None,
        continuous_usage: bool = False,
    ) -> Response:
        """`body_extra`: fields the whole answer adds at its top level (never streamed);
        `first_fields`: those the first of `first_choices`' chunks adds."""
        stream.streaming = streaming
        include_usage = include_usage or ctx.config.enable_force_include_usage
        if not streaming:
            choices = await collect(request, ctx.client, stream)
            body = {
                **self.base(chunk=False),
                "choices": [choice_json(c) for c in choices],
                "usage": usage(stream, self._completion_tokens(c.token_ids for c in choices)),
                **(body_extra(choices) if body_extra is not None else {}),
            }
            return JSONResponse(body)

        base = self.base(chunk=True)
        counted = [0]

        def chunk_for(d: SeqDelta) -> list[dict[str, Any]]:
            counted[0] += self._completion_tokens([d.token_ids])
            choice = delta_json(d)
            if choice is None:
                return []
            if continuous_usage:
                return [{**base, "choices": [choice], "usage": usage(stream, counted[0])}]
            return [{**base, "choices": [choice]}]

        def final_chunks() -> list[dict[str, Any]]:
            if not include_usage:
                return []
            return [{**base, "choices": [], "usage": usage(stream, counted[0])}]

        first = [{**base, "choices": [c]} for c in first_choices or []]
        if first and first_fields:
            first[0].update(first_fields)
        if continuous_usage:
            for chunk in first:
                chunk["usage"] = usage(stream, 0)
        return sse_response(ctx.client, stream, chunk_for, final_chunks, first)


def prompt_logprobs_json(
    name: Callable[[int], str], prompt: list[int], c: Choice
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: its
    logprob, rank and text (as `name` gives it)} for the token and the top alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for lp in (c.prompt_logprobs or [])[: len(prompt) - 1]:
        entry = {str(lp.token_id): _vllm_logprob(name, lp.token_id, lp.logprob, lp.rank)}
        for rank, (t, v) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=True), 1):
            entry.setdefault(str(t), _vllm_logprob(name, t, v, rank))
        out.append(entry)
    return out


def _vllm_logprob(
    name: Callable[[int], str], token_id: int, logprob: float, rank: int
) -> dict[str, Any]:
    return {"logprob": logprob, "rank": rank, "decoded_token": name(token_id)}
