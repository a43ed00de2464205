"""POST /v1/responses (OpenAI's Responses API) with the official client, against the shared server.

The same conversation answers the same greedy text as /v1/chat/completions; the streamed events
go through the client's own stream accumulator (`client.responses.stream`), which checks their
order and indices; tool calls come back as `function_call` items and go back as input.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.server import ServerProcess
from tests.e2e.test_structured_outputs import WEATHER as CHAT_WEATHER

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ASK = "Name three colors of the rainbow."
SYSTEM = "You are a terse assistant."
WEATHER = {"type": "function", **CHAT_WEATHER["function"]}  # Responses' tools are flat


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.0
    )  # fmt: skip


def test_text_and_usage_equal_chats(client: openai.OpenAI) -> None:
    chat = _chat(
        client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}], 24
    )
    r = client.responses.create(
        model=MODEL, instructions=SYSTEM, input=ASK, max_output_tokens=24, temperature=0.0
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    [message] = r.output
    assert message.type == "message" and message.role == "assistant"
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    assert r.instructions == SYSTEM and r.store is False and r.max_output_tokens == 24

    # input as message items, content as parts: the same prompt
    parts = [{"type": "input_text", "text": ASK}]
    items = [
        {"role": "system", "content": SYSTEM},
        {"type": "message", "role": "user", "content": parts},
    ]
    again = client.responses.create(model=MODEL, input=items, max_output_tokens=24, temperature=0.0)
    assert again.output_text == r.output_text
    assert again.usage is not None and again.usage.input_tokens == r.usage.input_tokens


def test_stream_events_accumulate_to_the_whole_response(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=ASK, max_output_tokens=20, temperature=0.0)
    with client.responses.stream(
        model=MODEL, input=ASK, max_output_tokens=20, temperature=0.0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == "response.completed"  # as vLLM ends a stream, whatever the status
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text == final.output_text
    assert len(deltas) > 1  # one event per step, not one at the end
    assert final.status == whole.status
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_a_named_function_call_and_its_output_go_back(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What's the weather in Tokyo?"}]
    choice = {"type": "function", "name": "get_weather"}
    r = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice=choice)
    assert r.status == "completed"
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    with client.responses.stream(
        model=MODEL, input=ask, tools=[WEATHER], tool_choice=choice
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(pieces) == done.arguments == final.output[0].arguments
    jsonschema.validate(json.loads(done.arguments), WEATHER["parameters"])

    # the call as the client got it (the output items, dumped as agent SDKs send them back),
    # and what the function returned: a text answer
    history = [
        *ask,
        *(item.model_dump(exclude_none=True) for item in r.output),
        {"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"},
    ]
    answer = client.responses.create(
        model=MODEL, input=history, tools=[WEATHER], tool_choice="none", max_output_tokens=30
    )
    assert [item.type for item in answer.output] == ["message"]
    assert answer.output_text
    assert answer.usage is not None and r.usage is not None
    assert answer.usage.input_tokens > r.usage.input_tokens  # the call and its output rendered

    # and the text answer sent back too, with a new question: `auto` with no tools is no tools
    again = client.responses.create(
        model=MODEL,
        input=[
            *history,
            *(item.model_dump(exclude_none=True) for item in answer.output),
            {"role": "user", "content": "Thanks. And tomorrow?"},
        ],
        tools=[],
        tool_choice="auto",
        max_output_tokens=5,
    )
    assert again.usage is not None and again.usage.input_tokens > answer.usage.input_tokens
    assert again.tool_choice == "none" and again.tools == []


def test_required_tool_calls_and_json_schema_text(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
        temperature=0.0, max_output_tokens=120,
    )  # fmt: skip
    assert r.output and all(item.type == "function_call" for item in r.output)
    for item in r.output:
        jsonschema.validate(json.loads(item.arguments), WEATHER["parameters"])
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "person", "schema": person}
    r = client.responses.create(
        model=MODEL, input="Describe a person as JSON.", text={"format": fmt}, max_output_tokens=60
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), person)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"previous_response_id": "resp_1"}, "response store"),
        ({"background": True}, "background"),
        ({"truncation": "middle"}, "truncation"),
        ({"include": ["message.output_audio"]}, "include"),
        ({"tool_choice": "required"}, "needs tools"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input",
        ),
        ({"input": []}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_what_is_not_served_is_a_400(
    server: ServerProcess, body: dict[str, Any], words: str
) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "Hi", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "BadRequestError"


def test_tools_without_a_choice_need_the_server_flags(server: ServerProcess) -> None:
    """`auto` (the default with tools) needs --enable-auto-tool-choice, as on the chat route."""
    r = httpx.post(
        f"{server.url}/v1/responses", json={"model": MODEL, "input": "Hi", "tools": [WEATHER]}
    )
    assert r.status_code == 400
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


def test_a_giant_input_is_refused_before_tokenizing(server: ServerProcess) -> None:
    """A 2 MB input goes through the body decoder process, which refuses what cannot fit the
    context however it tokenizes; the server answers the next request as before."""
    giant = [{"role": "user", "content": [{"type": "input_text", "text": "word " * 400_000}]}]
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": giant}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input" and "context" in error["message"]
    r = httpx.post(
        f"{server.url}/v1/responses",
        json={"model": MODEL, "input": "Hi", "max_output_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 3


def test_output_text_logprobs_equal_chats_whole_and_streamed(client: openai.OpenAI) -> None:
    """`include: ["message.output_text.logprobs"]` with `top_logprobs`: one entry per output
    token, the chat route's tokens and values; streamed, the deltas' entries add up to them."""
    messages = [{"role": "user", "content": ASK}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0.0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    want = chat.choices[0].logprobs.content
    asked: dict[str, Any] = {
        "model": MODEL, "input": ASK, "max_output_tokens": 8, "temperature": 0.0,
        "top_logprobs": 2, "include": ["message.output_text.logprobs"],
    }  # fmt: skip
    r = client.responses.create(**asked)
    got = r.output[0].content[0].logprobs
    assert [e.token for e in got] == [e.token for e in want]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in got)
    assert r.top_logprobs == 2

    with client.responses.stream(**asked) as stream:
        events = list(stream)
        final = stream.get_final_response()
    pieces = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert (
        [lp.token for lp in pieces] == [lp.token for lp in done.logprobs] == [e.token for e in got]
    )
    assert "".join(lp.token for lp in pieces) == final.output_text
    assert final.status == r.status == "incomplete"  # 8 tokens cut it: streamed, it says so too
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    plain = client.responses.create(model=MODEL, input=ASK, max_output_tokens=8)
    assert plain.output[0].content[0].logprobs == []


def test_truncation_auto_keeps_the_conversations_end(server: ServerProcess) -> None:
    """Over the 2048-token window: a 400 by default, served with `truncation: "auto"` (the
    prompt's last tokens, as vLLM reads it)."""
    long = "one two three four five six seven eight nine ten " * 300 + "Say hi."
    body = {"model": MODEL, "input": long, "max_output_tokens": 4}
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/responses", json={**body, "truncation": "auto"}, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 2048 - 4 - 64 <= usage["input_tokens"] <= 2048 - 4
    assert r.json()["truncation"] == "auto"


def test_an_engine_lost_mid_stream_ends_the_stream_with_response_failed() -> None:
    """The error path: a stream whose engine is killed (after text went out, so it cannot be
    re-sent) ends with one `response.failed` event naming the error; the engine is restarted
    and the next request is served."""
    srv = ServerProcess("--max-model-len", "1024", "--kv-cache-memory", "128MiB").wait_ready()
    try:
        body = {"model": MODEL, "input": "Tell a long story.", "max_output_tokens": 900,
                "stream": True}  # fmt: skip
        events: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{srv.url}/v1/responses", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 6:  # text is out: now lose the engine
                    os.kill(srv.child_titled("EngineCore_0"), signal.SIGKILL)
        last = events[-1]
        assert last["type"] == "response.failed", [e["type"] for e in events[-3:]]
        assert last["response"]["status"] == "failed"
        assert last["response"]["error"]["message"]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        srv.wait_ready()
        again = srv.client().responses.create(model=MODEL, input="Hi", max_output_tokens=3)
        assert again.usage is not None and again.usage.output_tokens == 3
    finally:
        assert srv.stop() == 0, srv.log_tail()
