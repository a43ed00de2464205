"""The shape both inference routes answer in: one JSON body, or SSE chunks and usage.

A route supplies only what differs: how a finished `Choice` reads (`choice_json`) and how a
streamed `SeqDelta` reads (`delta_json`, which may return None to send nothing yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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

    def base(self, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": self.chunk_object if chunk else self.object,
            "created": self.created,
            "model": self.model,
        }

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
    ) -> Response:
        stream.streaming = streaming
        if not streaming:
            choices = await collect(request, ctx.client, stream)
            body = {
                **self.base(chunk=False),
                "choices": [choice_json(c) for c in choices],
                "usage": usage(stream, sum(len(c.token_ids) for c in choices)),
            }
            return JSONResponse(body)

        base = self.base(chunk=True)
        counted = [0]

        def chunk_for(d: SeqDelta) -> list[dict[str, Any]]:
            counted[0] += len(d.token_ids)
            choice = delta_json(d)
            return [] if choice is None else [{**base, "choices": [choice]}]

        def final_chunks() -> list[dict[str, Any]]:
            if not include_usage:
                return []
            return [{**base, "choices": [], "usage": usage(stream, counted[0])}]

        first = [{**base, "choices": [c]} for c in first_choices or []]
        return sse_response(ctx.client, stream, chunk_for, final_chunks, first)
