"""Tool calling: the constraint behind `tool_choice`, and reading tool calls out of the output.

    tool_choice      what constrains the output           how calls are read
    none             nothing                              (plain text)
    required         a JSON array of {name, parameters}   every item is a call
    {function: f}    f's parameters schema                the whole output is f's arguments
    auto             nothing (the template shows tools)   the --tool-call-parser's format:
                                                          hermes: <tool_call>{...}</tool_call>
                                                          llama3_json: {"name", "parameters"}

Streaming follows vLLM: a call's first delta carries its id, type and name; its arguments follow
as text deltas that concatenate to the arguments' JSON.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from headrace.api.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from headrace.wire.messages import StructuredOutputsParams

ToolMode = Literal["none", "auto", "required", "named"]
_ARGUMENT_KEYS = ("arguments", "parameters")


def tool_mode(body: ChatCompletionRequest) -> ToolMode:
    """vLLM's default: `auto` when tools are given without a tool_choice, else `none`."""
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return "named"
    if choice is None:
        return "auto" if body.tools else "none"
    return choice


def named_tool(body: ChatCompletionRequest) -> str | None:
    choice = body.tool_choice
    return choice.function.name if isinstance(choice, NamedToolChoice) else None


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_constraint(body: ChatCompletionRequest, mode: ToolMode) -> StructuredOutputsParams | None:
    """`required`: an array of calls of the given tools; named: that tool's arguments."""
    tools = body.tools or []
    if mode == "named":
        assert isinstance(body.tool_choice, NamedToolChoice)
        name = body.tool_choice.function.name
        tool = next(t for t in tools if t.function.name == name)
        return StructuredOutputsParams(json=_parameters(tool))
    if mode != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": _parameters(t),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not body.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "id": call_id or new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


# -- reading a finished output -----------------------------------------------------------------
def parse_tool_calls(
    mode: ToolMode, parser: str | None, text: str, named: str | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a finished output. Output that does not parse as calls is all
    content (a truncated or malformed call is shown, never dropped)."""
    if mode == "none" or (mode == "auto" and parser is None):
        return text, []
    stream = ToolCallStream(mode, parser, named)
    content, _ = stream.feed(text)
    tail, _ = stream.finish()
    calls = stream.complete_calls()
    if calls is None:
        return text, []
    content = (content + tail).strip()
    return content or None, calls


# -- reading a streamed output -----------------------------------------------------------------
@dataclass(slots=True)
class _Call:
    call_id: str
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    name_sent: bool = False
    args_sent: int = 0  # offset into the scanner's text up to which arguments went out


class CallScanner:
    """Finds tool-call objects in JSON text that arrives in pieces: every object opened at
    nesting depth `base` is a call; its `name` string and the raw text of its `arguments` (or
    `parameters`) value are located as they complete. A list at depth `base` is looked into
    (a model may write `[{...}, {...}]` where one object was asked for)."""

    def __init__(self, base: int = 0) -> None:
        self.base = base
        self.lists: list[int] = []  # bases of lists looked into
        self.text = ""
        self.calls: list[_Call] = []
        self._i = 0
        self._depth = 0
        self._in_str = self._escaped = False
        self._str_start = 0
        self._state = "out"  # key, colon, value_wait, value, after
        self._key = ""
        self._value_start = 0
        self._value_kind = ""  # str, nest, prim

    def feed(self, piece: str) -> None:
        self.text += piece
        text = self.text
        while self._i < len(text):
            self._char(text[self._i], self._i)
            self._i += 1

    def _char(self, c: str, i: int) -> None:
        if self._in_str:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_str = False
                self._string_closed(i)
            return
        inside = self._depth == self.base + 1
        if c == '"':
            self._in_str, self._str_start = True, i
            if inside and self._state == "value_wait":
                self._begin_value(i, "str")
        elif c in "{[":
            if self._depth == self.base and c == "{":
                self.calls.append(_Call(new_call_id()))
                self._state = "key"
            elif self._depth == self.base and c == "[":
                self.lists.append(self.base)
                self.base += 1
            elif inside and self._state == "value_wait":
                self._begin_value(i, "nest")
            self._depth += 1
        elif c in "}]":
            if inside and self._value_kind == "prim":
                self._end_value(i)
            self._depth -= 1
            if self._depth == self.base + 1 and self._value_kind == "nest":
                self._end_value(i + 1)
            elif self._depth == self.base:
                self._state = "out"
            elif self._depth < self.base and self.lists and c == "]":
                self.base = self.lists.pop()
        elif inside and c == ":" and self._state == "colon":
            self._state = "value_wait"
        elif inside and c == ",":
            if self._value_kind == "prim":
                self._end_value(i)
            self._state = "key"
        elif inside and self._state == "value_wait" and not c.isspace():
            self._begin_value(i, "prim")

    def _string_closed(self, i: int) -> None:
        if self._depth != self.base + 1:
            return
        if self._state == "key":
            self._key = _json_or(self.text[self._str_start : i + 1], "")
            self._state = "colon"
        elif self._value_kind == "str":
            self._end_value(i + 1)

    def _begin_value(self, i: int, kind: str) -> None:
        self._value_start, self._value_kind, self._state = i, kind, "value"
        if self._key in _ARGUMENT_KEYS:
            self.calls[-1].args_start = i

    def _end_value(self, end: int) -> None:
        call, raw = self.calls[-1], self.text[self._value_start : end].rstrip()
        if self._key == "name" and self._value_kind == "str":
            call.name = _json_or(raw, None)
        elif self._key in _ARGUMENT_KEYS:
            call.args_end = self._value_start + len(raw)
        self._value_kind, self._state = "", "after"

    def deltas(self) -> list[dict[str, Any]]:
        """Tool-call deltas since the last call: a name once complete, then argument text."""
        out: list[dict[str, Any]] = []
        for index, call in enumerate(self.calls):
            if call.name is None:
                continue
            if not call.name_sent:
                call.name_sent = True
                delta = tool_call(call.name, "", call.call_id)
                out.append({"index": index, **delta})
            if call.args_start is None:
                continue
            upto = call.args_end if call.args_end is not None else len(self.text)
            if self._in_str or call.args_end is not None or self._value_kind != "prim":
                start = max(call.args_sent, call.args_start)
                if upto > start:
                    call.args_sent = upto
                    out.append({"index": index, "function": {"arguments": self.text[start:upto]}})
        return out


def merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One delta per call: a call's name and its first arguments travel together."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            out[-1]["function"]["arguments"] += d["function"]["arguments"]
        else:
            out.append(d)
    return out


def _json_or(text: str, default: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default


def _held(text: str, tag: str) -> int:
    """How many trailing characters of `text` could be the start of `tag` (held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """One choice's output as content deltas and tool-call deltas, for every tool mode."""

    START, END = "<tool_call>", "</tool_call>"
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, mode: ToolMode, parser: str | None, named: str | None = None) -> None:
        self.mode, self.parser, self.named = mode, parser, named
        self.scanner = CallScanner(base=1 if mode == "required" else 0)
        self._buf = ""
        self._inside = False  # hermes: within <tool_call> ... </tool_call>
        self._decided: bool | None = None  # llama3_json: the output is calls (True) or text
        self._named_call = new_call_id()
        self._named_text = ""
        self._named_sent = False

    @property
    def parses(self) -> bool:
        return self.mode in ("required", "named") or (self.mode == "auto" and bool(self.parser))

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool-call deltas) for the next piece of text."""
        content, calls = self._feed(piece)
        return content, merged(calls)

    def _feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        if not self.parses:
            return piece, []
        if self.mode == "named":
            return "", self._feed_named(piece)
        if self.mode == "required":
            self.scanner.feed(piece)
            return "", self.scanner.deltas()
        if self.parser == "hermes":
            return self._feed_hermes(piece)
        return self._feed_llama3(piece)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Whatever was held back, at the end of the output."""
        buf, self._buf = self._buf, ""
        if self.parser == "hermes" and self.mode == "auto":
            if self._inside:
                self.scanner.feed(buf)
                return "", self.scanner.deltas()
            return buf, []
        if self.parser == "llama3_json" and self.mode == "auto" and not self._decided:
            return buf, []
        return "", []

    @property
    def called(self) -> bool:
        """At least one call went out (finish_reason `tool_calls`)."""
        if self.mode == "named":
            return self._named_sent
        return any(c.name_sent for c in self.scanner.calls)

    def complete_calls(self) -> list[dict[str, Any]] | None:
        """Every call with its arguments as compact JSON, or None if any did not parse."""
        if self.mode == "named":
            args = _json_or(self._named_text, None)
            if not isinstance(args, dict):
                return None
            assert self.named is not None
            return [tool_call(self.named, json.dumps(args, ensure_ascii=False))]
        calls = []
        for call in self.scanner.calls:
            if call.name is None or call.args_start is None or call.args_end is None:
                return None
            args = _json_or(self.scanner.text[call.args_start : call.args_end], None)
            if not isinstance(args, dict):
                return None
            calls.append(tool_call(call.name, json.dumps(args, ensure_ascii=False)))
        return calls or None

    def _feed_named(self, piece: str) -> list[dict[str, Any]]:
        self._named_text += piece
        out = []
        if not self._named_sent:
            self._named_sent = True
            assert self.named is not None
            out.append({"index": 0, **tool_call(self.named, "", self._named_call)})
        if piece:
            out.append({"index": 0, "function": {"arguments": piece}})
        return out

    def _feed_hermes(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += piece
        content = ""
        while True:
            tag = self.END if self._inside else self.START
            k = self._buf.find(tag)
            cut = k if k >= 0 else len(self._buf) - _held(self._buf, tag)
            if self._inside:
                self.scanner.feed(self._buf[:cut])
            else:
                content += self._buf[:cut]
            if k < 0:
                self._buf = self._buf[cut:]
                return content, self.scanner.deltas()
            self._buf = self._buf[k + len(tag) :]
            self._inside = not self._inside

    def _feed_llama3(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        if self._decided is None:
            self._buf += piece
            head = self._buf.lstrip()
            if not head or (self.PYTHON_TAG.startswith(head) and head != self.PYTHON_TAG):
                return "", []
            self._decided = head.startswith(("{", "[", self.PYTHON_TAG))
            piece, self._buf = self._buf, ""
            if self._decided:
                piece = piece.lstrip().removeprefix(self.PYTHON_TAG)
        if not self._decided:
            return piece, []
        self.scanner.feed(piece)
        return "", self.scanner.deltas()
