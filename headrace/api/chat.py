"""POST /v1/chat/completions: render the chat template, then generate; JSON or SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from headrace.api.answer import Answer, prompt_logprobs_json
from headrace.api.body import parse_body
from headrace.api.context import ServerContext
from headrace.api.errors import APIError
from headrace.api.protocol import ChatCompletionRequest
from headrace.api.tools import (
    ToolCallStream,
    ToolMode,
    merged,
    named_tool,
    parse_tool_calls,
    tool_constraint,
    tool_mode,
)
from headrace.api.validation import (
    check_constraint,
    context_of,
    pinned_rank,
    prompt_limits,
    require_json,
    sampling_params,
    start,
)
from headrace.frontend.output import Choice, RequestStream, SeqDelta
from headrace.frontend.tokenize import FrontendTokenizer, PromptLimits, PromptTooLongError
from headrace.wire.messages import SamplingParams, StructuredOutputsParams, TokenLogprobs

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_json)])
async def create_chat_completion(request: Request) -> Response:
    """1. decode + validate off the loop 2. template + tokenize off the loop 3. send to the
    engines 4. answer."""
    arrival = time.monotonic()
    body = await parse_body(request, ChatCompletionRequest)
    ctx = context_of(request)
    model = ctx.check_model(body.model)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    started = await start_chat(request, ctx, body, request_id, arrival)
    stream, prompt = started.stream, started.prompt
    answer = Answer(request_id, model, "chat.completion", "chat.completion.chunk")
    choices = _ChatChoices(started.tok, body, started.mode, started.parser)
    # vLLM's: the prompt's ids and logprobs once, at the top (its ids in the first chunk)
    prompt_ids = {"prompt_token_ids": prompt} if body.return_token_ids else {}

    def top_level(whole: list[Choice]) -> dict[str, Any]:
        if body.prompt_logprobs is None or not whole:
            return prompt_ids
        return {
            **prompt_ids,
            "prompt_logprobs": prompt_logprobs_json(choices.name, prompt, whole[0]),
        }

    return await answer.respond(
        request, ctx, stream, body.stream, body.include_usage, choices.whole, choices.delta,
        choices.first(), top_level, prompt_ids, body.continuous_usage,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StartedChat:
    """A chat request in the engines: its stream, prompt, and how tool calls are read."""

    stream: RequestStream
    prompt: list[int]
    tok: FrontendTokenizer
    mode: ToolMode
    parser: str | None


async def start_chat(
    request: Request,
    ctx: ServerContext,
    body: ChatCompletionRequest,
    request_id: str,
    arrival: float,
) -> StartedChat:
    """Checks (400s before any work is queued), the template and tokens off the loop, then the
    engines: what /v1/chat/completions and /v1/responses share."""
    tok = ctx.require_serving()
    pinned = pinned_rank(ctx, request, body.data_parallel_rank)
    max_tokens = body.requested_max_tokens
    limits = prompt_limits(ctx, max_tokens, body.truncate_prompt_tokens)
    mode = tool_mode(body)
    parser = _tool_parser(ctx, mode)
    params = await sampling_params(
        body, tok, max_tokens, body.num_logprobs, body.prompt_logprobs,
        ctx.config.sampling_defaults,
    )  # fmt: skip
    constrained = tool_constraint(body, mode)
    params = _with_tool_constraint(params, mode, constrained)
    await check_constraint(params, body, from_tools=constrained is not None)
    with ctx.admission.admit(body.n):
        prompt = await _render(tok, body, limits)
        stream = await start(ctx, request_id, [prompt], params, arrival, pinned)
    return StartedChat(stream, prompt, tok, mode, parser)


class _ChatChoices:
    """How one request's choices read: whole (`message`) or streamed (`delta`), with tool calls
    read out of the text by one `ToolCallStream` per choice."""

    def __init__(
        self,
        tok: FrontendTokenizer,
        body: ChatCompletionRequest,
        mode: ToolMode,
        parser: str | None,
    ) -> None:
        self.tok, self.body, self.mode, self.parser = tok, body, mode, parser
        self.name = body.token_namer(tok.token_text)
        self.named = named_tool(body)
        self.echo = ""
        if body.echo and body.messages[-1].role == "assistant":
            self.echo = body.messages[-1].as_template_input()["content"]
        self.readers = {i: ToolCallStream(mode, parser, self.named) for i in range(body.n)}

    def first(self) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": self.echo},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.body.n)
        ]

    def whole(self, c: Choice) -> dict[str, Any]:
        content, calls = parse_tool_calls(self.mode, self.parser, c.text, self.named)
        message: dict[str, Any] = {"role": "assistant", "content": _joined(self.echo, content)}
        if calls:
            message["tool_calls"] = calls
        out = {
            "index": c.index,
            "message": message,
            "logprobs": {"content": logprob_entries(self.name, c.logprobs)}
            if self.body.logprobs
            else None,
            "finish_reason": _finish_reason(c.finish_reason, bool(calls)),
            "stop_reason": c.stop_reason,
        }
        if self.body.return_token_ids:
            out["token_ids"] = c.token_ids
        return out

    def delta(self, d: SeqDelta) -> dict[str, Any] | None:
        reader = self.readers[d.index]
        content, calls = reader.feed(d.text)
        if d.finish_reason is not None:
            tail, more = reader.finish()
            content, calls = content + tail, merged(calls + more)
        delta: dict[str, Any] = {}
        if content or (d.finish_reason is None and not reader.parses):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        ids_asked = self.body.return_token_ids and d.token_ids  # every id goes out at once
        if not delta and d.finish_reason is None and not d.logprobs and not ids_asked:
            return None  # held back: part of a tag, or of a call not yet named
        out = {
            "index": d.index,
            "delta": delta,
            "logprobs": {"content": logprob_entries(self.name, d.logprobs)} if d.logprobs else None,
            "finish_reason": _finish_reason(d.finish_reason, reader.called),
            "stop_reason": d.stop_reason,
        }
        if self.body.return_token_ids:
            out["token_ids"] = d.token_ids
        return out


def _tool_parser(ctx: ServerContext, mode: ToolMode) -> str | None:
    """The parser for `auto`; 400 if the server was not started to choose tools itself."""
    cfg = ctx.config
    if mode == "auto" and not (cfg.enable_auto_tool_choice and cfg.tool_call_parser):
        raise APIError(
            400,
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
            "set",
            param="tool_choice",
        )
    return cfg.tool_call_parser if mode == "auto" else None


def _with_tool_constraint(
    params: SamplingParams, mode: ToolMode, constraint: StructuredOutputsParams | None
) -> SamplingParams:
    if constraint is None:
        return params
    if params.structured_outputs is not None:
        raise APIError(
            400,
            f'tool_choice "{mode}" constrains the output itself: it cannot be combined with '
            "response_format or structured_outputs",
            param="tool_choice",
        )
    return msgspec.structs.replace(params, structured_outputs=constraint)


def _joined(echo: str, content: str | None) -> str | None:
    if content is None:
        return echo or None
    return echo + content


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


async def _render(
    tok: FrontendTokenizer, body: ChatCompletionRequest, limits: PromptLimits
) -> list[int]:
    messages = [m.as_template_input() for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        text = await tok.render_chat(
            messages,
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
            tools,
        )
    except Exception as exc:  # jinja errors: the template refused these messages
        raise APIError(400, f"the chat template could not render these messages: {exc}") from None
    try:
        ids = await tok.encode_prompt(text, limits, body.add_special_tokens)
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if not ids:  # a template that rendered nothing the tokenizer keeps
        raise APIError(400, "the rendered chat prompt is empty once tokenized", param="messages")
    return ids


def logprob_entries(name: Callable[[int], str], items: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """OpenAI's logprobs entries (chat's `logprobs.content`, Responses' `output_text.logprobs`):
    one per token (as `name` gives it), each with its top alternatives."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = name(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for lp in items:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [
            entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
        content.append(item)
    return content
