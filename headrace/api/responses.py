"""POST /v1/responses: OpenAI's Responses API over the chat route's machinery.

The request reads as a chat request (`api/responses_request.py`); the answer is a `response`
object whose `output` holds a `message` item (the text) and a `function_call` item per tool
call, or, streamed, the Responses events in order:

    response.created, response.in_progress
    per item: response.output_item.added
      message:  response.content_part.added, response.output_text.delta ...,
                response.output_text.done, response.content_part.done
      call:     response.function_call_arguments.delta ..., response.function_call_arguments.done
    response.output_item.done
    response.completed (its status `incomplete` at max_output_tokens, or aborted at shutdown)

Every event carries `sequence_number`; the stream has `event:` lines and no `[DONE]`. An engine
error after the stream began is one `response.failed` event.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from headrace.api.body import parse_body
from headrace.api.chat import logprob_entries, start_chat
from headrace.api.responses_request import ResponsesRequest
from headrace.api.streaming import SseStyle, collect, sse_response, usage
from headrace.api.tools import ToolCallStream, merged, named_tool, parse_tool_calls
from headrace.api.validation import context_of, require_json
from headrace.frontend.output import RequestStream, SeqDelta

router = APIRouter()
_json = msgspec.json.Encoder()


@router.post("/v1/responses", dependencies=[Depends(require_json)])
async def create_response(request: Request) -> Response:
    """1. decode + validate off the loop 2. as a chat request: template, tokens, engines
    3. answer as a `response` object or its events."""
    arrival = time.monotonic()
    body = await parse_body(request, ResponsesRequest)
    ctx = context_of(request)
    model = ctx.check_model(body.model)
    chat = body.as_chat()  # built while the body was validated
    response_id = f"resp_{uuid.uuid4().hex}"
    started = await start_chat(request, ctx, chat, response_id, arrival)
    shape = _Shape(response_id, model, body, started.stream)
    named = named_tool(chat)
    name = chat.token_namer(started.tok.token_text)
    if not body.stream:
        started.stream.streaming = False
        choice = (await collect(request, ctx.client, started.stream))[0]
        content, calls = parse_tool_calls(started.mode, started.parser, choice.text, named)
        status, incomplete = _status(choice.finish_reason)
        logprobs = logprob_entries(name, choice.logprobs) if body.logprobs and not calls else []
        output = _whole_output(content, calls, status, logprobs)
        counted = shape.usage(len(choice.token_ids))
        return JSONResponse(shape.response(status, output, counted, incomplete))

    started.stream.streaming = True
    namer = name if body.logprobs else None
    events = _Events(shape, ToolCallStream(started.mode, started.parser, named), namer)
    style = SseStyle(_sse, events.failed, b"")
    return sse_response(
        ctx.client, started.stream, events.delta, events.end, events.start(), style=style
    )


def _whole_output(
    content: str | None,
    calls: list[dict[str, Any]],
    status: str,
    logprobs: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """A finished response's items: its text (unless the output is calls alone), then a
    `function_call` item per call."""
    items = (
        [_message(_new_id("msg"), content or "", status, logprobs)] if content or not calls else []
    )
    for c in calls:
        items.append(_function_call(c["id"], c["function"]["name"], c["function"]["arguments"]))
    return items


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + _json.encode(event) + b"\n\n"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _status(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details): a stop or a tool call completes; the token limit, or an
    abort at shutdown, leaves the response incomplete."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "abort":
        return "incomplete", {"reason": "abort"}
    return "completed", None


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _message(
    item_id: str, text: str | None, status: str, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text, logprobs)]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _function_call(
    call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _new_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class _Shape:
    """The fields every `response` object of one request shares."""

    def __init__(self, response_id: str, model: str, body: ResponsesRequest, stream: RequestStream):
        self.id, self.model, self.stream = response_id, model, stream
        self.created_at = int(time.time())
        self.echoed = body.echoed()

    def usage(self, output_tokens: int) -> dict[str, Any]:
        """The chat route's usage, in Responses' names."""
        counted = usage(self.stream, output_tokens)
        return {
            "input_tokens": counted["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": self.stream.num_cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counted["total_tokens"],
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        incomplete: dict[str, str] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": self.model,
            "status": status,
            "output": output,
            "usage": usage,
            "incomplete_details": incomplete,
            "error": error,
            **self.echoed,
        }


class _Events:
    """One streamed response: each delta's text and tool-call pieces become Responses events,
    items opened as their first piece arrives and closed at the end."""

    def __init__(
        self, shape: _Shape, reader: ToolCallStream, name: Callable[[int], str] | None
    ) -> None:
        self.shape, self.reader, self.name = shape, reader, name
        self.logprobs: list[dict[str, Any]] = []  # every text token's, as sent
        self.unsent: list[dict[str, Any]] = []  # tokens whose text is held back (a tag?)
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # by output_index
        self.message: dict[str, Any] | None = None
        self.text = ""
        self.calls: dict[int, dict[str, Any]] = {}  # the tool-call index -> its item
        self.tokens = 0
        self.finish_reason: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.shape.response("in_progress", [], None)
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def delta(self, d: SeqDelta) -> list[dict[str, Any]]:
        self.tokens += len(d.token_ids)
        if self.name is not None and d.logprobs:
            self.unsent += logprob_entries(self.name, d.logprobs)
        content, calls = self.reader.feed(d.text)
        if d.finish_reason is not None:
            tail, more = self.reader.finish()
            content, calls = content + tail, merged(calls + more)
            self.finish_reason = d.finish_reason
        events = self._text(content) if content else []
        if calls:  # a call's tokens: no logprobs (its arguments have none)
            self.unsent = []
        for call in calls:
            events += self._call(call)
        return events

    def _open(self, item: dict[str, Any]) -> dict[str, Any]:
        self.items.append(item)
        # a copy: the item grows after this event is made, before it is written
        added = copy.deepcopy(item)
        return self._event(
            "response.output_item.added", output_index=len(self.items) - 1, item=added
        )

    def _open_message(self) -> list[dict[str, Any]]:
        self.message = _message(_new_id("msg"), None, "in_progress")
        return [
            self._open(self.message),
            self._event(
                "response.content_part.added",
                item_id=self.message["id"],
                output_index=len(self.items) - 1,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def _text(self, piece: str) -> list[dict[str, Any]]:
        events = self._open_message() if self.message is None else []
        assert self.message is not None
        self.text += piece
        logprobs, self.unsent = self.unsent, []
        self.logprobs += logprobs
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self.message["id"],
                output_index=self.items.index(self.message),
                content_index=0,
                delta=piece,
                logprobs=logprobs,
            )
        )
        return events

    def _call(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        item = self.calls.get(delta["index"])
        if item is None:  # its first delta: id and name
            item = _function_call(delta["id"], delta["function"]["name"], "", "in_progress")
            self.calls[delta["index"]] = item
            events.append(self._open(item))
        piece = delta["function"]["arguments"]
        if piece:
            item["arguments"] += piece
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.items.index(item),
                    delta=piece,
                )
            )
        return events

    def end(self) -> list[dict[str, Any]]:
        """Close every open item, then the response with its usage."""
        status, incomplete = _status(self.finish_reason)
        events = [] if self.message is not None or self.calls else self._open_message()
        for index, item in enumerate(self.items):
            if item is self.message:
                events += self._close_message(index, status)
            else:
                item["status"] = "completed"
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
                events.append(
                    self._event("response.output_item.done", output_index=index, item=item)
                )
        final = self.shape.response(status, self.items, self.shape.usage(self.tokens), incomplete)
        # response.completed whatever the status, as vLLM and SGLang end a stream (and what the
        # openai client's stream helper waits for); the status inside says `incomplete`
        return [*events, self._event("response.completed", response=final)]

    def _close_message(self, index: int, status: str) -> list[dict[str, Any]]:
        assert self.message is not None
        part = _text_part(self.text, self.logprobs)
        self.message["content"] = [part]
        self.message["status"] = status
        item_id = self.message["id"]
        return [
            self._event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=self.text,
                logprobs=self.logprobs,
            ),
            self._event(
                "response.content_part.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=part,
            ),
            self._event("response.output_item.done", output_index=index, item=self.message),
        ]

    def failed(self, message: str) -> list[dict[str, Any]]:
        error = {"code": "server_error", "message": message}
        failed = self.shape.response("failed", self.items, None, error=error)
        return [self._event("response.failed", response=failed)]
