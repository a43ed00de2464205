"""Structured outputs and tool calling against a live server, with the official openai client.

One server runs the shipped Hermes template with `--enable-auto-tool-choice --tool-call-parser
hermes`; the constraints (json_schema, json_object, choice, regex, grammar) need no flag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.server import ServerProcess

TEMPLATE = Path(__file__).parents[2] / "examples" / "tool_chat_template_smollm2_hermes.jinja"
MODEL = "SmolLM2-135M-Instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What's the weather in Tokyo?"}]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    server = ServerProcess(
        "--max-model-len", "2048", "--chat-template", str(TEMPLATE),
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> openai.OpenAI:
    return srv.client()


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("messages", [{"role": "user", "content": "Describe a person as JSON."}])
    kw.setdefault("max_tokens", 150)
    return client.chat.completions.create(model=MODEL, **kw)


def _json_schema(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def test_json_schema_at_temperature_one_validates(client: openai.OpenAI) -> None:
    for seed in range(4):
        r = _chat(client, temperature=1.0, seed=seed, response_format=_json_schema(PERSON))
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_schema_streamed_validates(client: openai.OpenAI) -> None:
    for seed in range(2):
        chunks = _chat(
            client, temperature=1.0, seed=seed, stream=True, response_format=_json_schema(PERSON)
        )
        text, reasons = "", []
        for chunk in chunks:
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
        assert reasons[-1] == "stop"
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_parses(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    r = _chat(client, messages=ask, temperature=0.0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_max_tokens_cutting_json_says_length(client: openai.OpenAI) -> None:
    r = _chat(client, max_tokens=4, response_format=_json_schema(PERSON))
    assert r.choices[0].finish_reason == "length"


def test_choice_regex_and_grammar(client: openai.OpenAI) -> None:
    colors = ["red", "green", "blue"]
    r = client.completions.create(
        model=MODEL, prompt="My favourite color is", max_tokens=8, temperature=1.0,
        extra_body={"structured_outputs": {"choice": colors}},
    )  # fmt: skip
    assert r.choices[0].text in colors
    r = _chat(client, extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} \d{1,3}"}})
    assert re.fullmatch(r"[A-Z][a-z]{2,8} \d{1,3}", r.choices[0].message.content)
    ebnf = 'root ::= "(" num " " op " " num ")"\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-"'
    r = _chat(client, temperature=1.0, seed=3, extra_body={"structured_outputs": {"grammar": ebnf}})
    assert re.fullmatch(r"\([1-9][0-9]? [+-] [1-9][0-9]?\)", r.choices[0].message.content)
    r = _chat(client, extra_body={"guided_choice": ["yes", "no"]})  # vLLM's older name
    assert r.choices[0].message.content in ("yes", "no")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": _json_schema({"type": "object", "properties": {"a": {"type": 7}}})},
         "response_format"),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, None),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, None),
        ({"response_format": {"type": "json_schema"}}, None),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         None),
        ({"tool_choice": "required"}, None),
    ],
)  # fmt: skip
def test_bad_constraints_are_400(srv: ServerProcess, body: dict[str, Any], param: str) -> None:
    r = httpx.post(
        f"{srv.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError"
    if param is not None:
        assert error["param"] == param
        assert "constraint" in error["message"]


def _arguments(call: Any) -> dict[str, Any]:
    assert call.type == "function"
    assert call.id
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    return args


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    r = _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        tool = WEATHER if call.function.name == "get_weather" else TIME
        jsonschema.validate(_arguments(call), tool["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_time"}}
    r = _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice=named)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(_arguments(call), TIME["function"]["parameters"])
    assert r.choices[0].finish_reason == "tool_calls"


def _streamed_calls(client: openai.OpenAI, **kw: Any) -> tuple[list[dict[str, Any]], str]:
    calls: dict[int, dict[str, Any]] = {}
    reason = ""
    for chunk in _chat(client, messages=ASK, stream=True, **kw):
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call: id, type and name
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and not d.function.name
            calls[d.index]["arguments"] += d.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason


def test_tool_calls_stream_name_first_then_arguments(client: openai.OpenAI) -> None:
    calls, reason = _streamed_calls(client, tools=[WEATHER], tool_choice="required")
    assert reason == "tool_calls" and calls
    for call in calls:
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    [call], reason = _streamed_calls(client, tools=[WEATHER], tool_choice=named)
    assert reason == "tool_calls"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_auto_calls_a_tool_and_the_result_goes_back(client: openai.OpenAI) -> None:
    r = _chat(client, messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=0.0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert _arguments(call) == {"city": "Tokyo"}
    calls, reason = _streamed_calls(client, tools=[WEATHER], temperature=0.0)  # auto: default
    assert reason == "tool_calls"
    assert [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Tokyo"}

    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees C and sunny"},
    ]
    r = _chat(client, messages=history, tools=[WEATHER], tool_choice="none", temperature=0.0)
    answer = r.choices[0]
    assert not answer.message.tool_calls
    assert answer.message.content
    assert answer.finish_reason in ("stop", "length")


def test_responses_api_auto_calls_a_tool(client: openai.OpenAI) -> None:
    """/v1/responses with the hermes parser: the call is a `function_call` item, whole and
    streamed (its arguments as they arrived)."""
    flat = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(model=MODEL, input=ASK, tools=[flat], temperature=0.0)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Tokyo"}
    with client.responses.stream(model=MODEL, input=ASK, tools=[flat], temperature=0.0) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Tokyo"}
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-1] == "response.completed"


def test_auto_without_a_tool_call_answers_in_text(client: openai.OpenAI) -> None:
    r = _chat(
        client, messages=[{"role": "user", "content": "What is 2+2?"}], tools=[WEATHER],
        temperature=0.0, max_tokens=20,
    )  # fmt: skip
    assert not r.choices[0].message.tool_calls
    assert "4" in r.choices[0].message.content


def test_auto_needs_the_server_flags(server: ServerProcess) -> None:
    """The shared server runs without --enable-auto-tool-choice: `auto` is refused, as vLLM does;
    `required` still works (it needs no parser)."""
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "tools": [WEATHER], "max_tokens": 5},
    )
    assert r.status_code == 400
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
              "max_tokens": 40, "temperature": 0},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
