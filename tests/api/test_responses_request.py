"""A Responses request read as the chat request it is served as."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from headrace.api.responses_request import ResponsesRequest

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def test_instructions_input_and_calls_become_chat_messages() -> None:
    req = ResponsesRequest.model_validate(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
                {"type": "message", "role": "assistant", "content": "Let me look."},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {
                    "type": "function_call",
                    "call_id": "c2",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2", "output": "rain"},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 7,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        }
    )
    chat = req.as_chat()
    got = [(m.role, m.as_template_input()["content"]) for m in chat.messages]
    assert got == [
        ("system", "Be brief."),
        ("user", "Weather?"),
        ("assistant", "Let me look."),  # one turn: its text, then both calls
        ("tool", "sunny"),
        ("tool", "rain"),
    ]
    calls = chat.messages[2].tool_calls or []
    assert [c.id for c in calls] == ["c1", "c2"]
    assert [m.tool_call_id for m in chat.messages[3:]] == ["c1", "c2"]
    assert chat.requested_max_tokens == 7
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert chat.tool_choice is not None and chat.tool_choice.function.name == "get_weather"  # type: ignore[union-attr]
    assert chat.response_format is not None and chat.response_format.type == "json_schema"
    assert req.num_chars() == len("Be brief.Weather?Let me look.{}{}sunnyrain")


def test_a_call_without_a_message_before_opens_an_assistant_turn() -> None:
    req = ResponsesRequest.model_validate(
        {
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            ]
        }
    )
    [_, assistant] = req.as_chat().messages
    assert assistant.role == "assistant" and assistant.content is None
    assert [c.function.name for c in assistant.tool_calls or []] == ["f"]


@pytest.mark.parametrize(
    "extra",
    [
        {"previous_response_id": "resp_x"},
        {"background": True},
        {"truncation": "middle"},
        {"tool_choice": {"type": "function", "name": "absent"}, "tools": [TOOL]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        {"input": [{"type": "item_reference", "id": "msg_1"}]},  # needs the store
        {"input": [{"type": "reasoning", "summary": []}]},  # nothing to answer
    ],
)
def test_what_is_not_served_is_refused(extra: dict) -> None:
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"input": "Hi", **extra})


def test_sampling_fields_reach_the_chat_request() -> None:
    req = ResponsesRequest.model_validate(
        {
            "input": "Hi",
            "truncation": "auto",
            "top_logprobs": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "temperature": 0.3,
            "top_p": 0.9,
        }
    )
    chat = req.as_chat()
    assert chat.truncate_prompt_tokens == -1  # as many as fit: the conversation's end
    assert chat.logprobs and chat.top_logprobs == 3
    assert (chat.presence_penalty, chat.frequency_penalty) == (0.5, -0.5)
    assert (chat.temperature, chat.top_p) == (0.3, 0.9)
    plain = ResponsesRequest.model_validate({"input": "Hi"}).as_chat()
    assert plain.truncate_prompt_tokens is None and not plain.logprobs
    included = ResponsesRequest.model_validate(
        {"input": "Hi", "include": ["message.output_text.logprobs"]}
    ).as_chat()
    assert included.logprobs and included.num_logprobs == 0


def test_the_chat_request_is_built_by_validation_and_survives_pickling() -> None:
    """Large bodies are validated in the body-decoder process (api/body.py), which sends the
    model back pickled: the chat request comes with it, so the event loop builds nothing."""
    req = ResponsesRequest.model_validate({"input": "Hi", "instructions": "Be brief."})
    back = pickle.loads(pickle.dumps(req))
    assert back.as_chat() == req.as_chat()
    assert [m.role for m in back.as_chat().messages] == ["system", "user"]
