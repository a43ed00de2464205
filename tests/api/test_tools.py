"""Reading tool calls out of model text, whole and streamed in pieces of any size."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from headrace.api.tools import ToolCallStream, ToolMode, parse_tool_calls

HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"days": [1, 2], "note": "say \\"hi\\" {ok}"}}\n</tool_call>\n<tool_call>\n'
    '{"arguments": {"zone": "CET"}, "name": "get_time"}\n</tool_call>'
)
CALLS = [
    ("get_weather", {"city": "Paris", "days": [1, 2], "note": 'say "hi" {ok}'}),
    ("get_time", {"zone": "CET"}),
]


def _streamed(
    mode: ToolMode, parser: str | None, text: str, sizes: list[int], named: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Feed `text` in pieces of the given sizes; assemble what a client would."""
    reader = ToolCallStream(mode, parser, named)
    content, calls = "", {}
    pieces, i = [], 0
    for n in sizes:
        pieces.append(text[i : i + n])
        i += n
    pieces.append(text[i:])
    outputs = [reader.feed(p) for p in pieces] + [reader.finish()]
    for piece_content, deltas in outputs:
        content += piece_content
        indexes = [d["index"] for d in deltas]
        assert len(indexes) == len(set(indexes)), "one delta per call per chunk"
        for d in deltas:
            if d["index"] not in calls:
                assert d["type"] == "function" and d["id"] and d["function"]["name"]
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert "id" not in d and "name" not in d["function"]
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def _random_sizes(text: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 7) for _ in range(len(text))]


@pytest.mark.parametrize("seed", range(5))
def test_hermes_streamed_in_any_pieces_equals_whole(seed: int) -> None:
    content, calls = _streamed("auto", "hermes", HERMES, _random_sizes(HERMES, seed))
    assert content.strip() == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == CALLS
    whole_content, whole = parse_tool_calls("auto", "hermes", HERMES)
    assert whole_content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole] == CALLS


def test_hermes_text_that_only_looks_like_a_tag_is_content() -> None:
    text = "a < b and <tool> is not <tool_cal"
    content, calls = _streamed("auto", "hermes", text, [1] * len(text))
    assert content == text and calls == []
    assert parse_tool_calls("auto", "hermes", text) == (text, [])


def test_hermes_list_inside_one_tag() -> None:
    text = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]'
    text += "</tool_call>"
    _, calls = parse_tool_calls("auto", "hermes", text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "{}"),
        ("b", '{"x": 1}'),
    ]


def test_a_malformed_or_cut_call_is_all_content() -> None:
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert parse_tool_calls("auto", "hermes", cut) == (cut, [])


@pytest.mark.parametrize("seed", range(3))
def test_llama3_json(seed: int) -> None:
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2], '
        '"note": "say \\"hi\\" {ok}"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'
    )
    content, calls = _streamed("auto", "llama3_json", text, _random_sizes(text, seed))
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == CALLS
    assert parse_tool_calls("auto", "llama3_json", "The answer is 4.") == ("The answer is 4.", [])


def test_required_array_and_named_arguments() -> None:
    text = '[{"name": "get_time", "parameters": {"zone": "CET"}}, {"name": "get_weather", '
    text += '"parameters": {"city": "Paris", "days": [1, 2], "note": "say \\"hi\\" {ok}"}}]'
    _, calls = _streamed("required", None, text, _random_sizes(text, 1))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == CALLS[::-1]
    args = '{"city": "Paris"}'
    _, [call] = _streamed("named", None, args, [2, 3, 1], named="get_weather")
    assert call == {"name": "get_weather", "arguments": args}
    content, [whole] = parse_tool_calls("named", None, args, named="get_weather")
    assert content is None and json.loads(whole["function"]["arguments"]) == {"city": "Paris"}


def test_none_and_auto_without_a_parser_are_plain_text() -> None:
    for mode, parser in (("none", None), ("auto", None)):
        assert parse_tool_calls(mode, parser, HERMES) == (HERMES, [])  # type: ignore[arg-type]
