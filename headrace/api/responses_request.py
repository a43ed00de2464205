"""The body of POST /v1/responses (OpenAI's Responses API) and the chat request it reads as.

A Responses request is a conversation (`instructions`, then `input`: text, messages, function
calls and their outputs) with function tools and an output format. headrace serves it through
the chat route's machinery: `as_chat()` gives the `ChatCompletionRequest` with the same
messages, tools, tool choice, constraint and limits, and the route answers in Responses' shape.

What this server does not keep or do is refused with a 400 rather than ignored: the response
store (`previous_response_id`; `store` is accepted and answered as false, as vLLM does with its
store off), `background`, and input other than text (images, files). `truncation: "auto"`
keeps a conversation's last tokens where it would not fit (vLLM's reading of it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from headrace.api.protocol import (
    INT32_MAX,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    Penalty,
    ResponseFormat,
    Text,
    TextPart,
    Tool,
    ToolCall,
)


class InputText(BaseModel):
    """A text part of a message: `input_text`, or `output_text` in an earlier answer sent back."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def num_chars(self) -> int:
        if isinstance(self.content, list):
            return sum(len(p.text) for p in self.content)
        return len(self.content)

    def as_chat(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            return ChatMessage(
                role=self.role, content=[TextPart(type="text", text=p.text) for p in content]
            )
        return ChatMessage(role=self.role, content=content)


class FunctionCallItem(BaseModel):
    """A call the model made earlier, sent back with the conversation."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str

    def num_chars(self) -> int:
        return len(self.arguments)


class FunctionCallOutput(BaseModel):
    """What the caller's function returned for `call_id`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str

    def num_chars(self) -> int:
        return len(self.output)


class ReasoningItem(BaseModel):
    """A reasoning model's earlier reasoning, sent back with the conversation (OpenAI's clients
    send it with the turn it belongs to). The models served here do not reason in items: it is
    accepted and left out of the prompt, as its summary is not the model's own text."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]

    def num_chars(self) -> int:
        return 0


InputItem = InputMessage | FunctionCallItem | FunctionCallOutput | ReasoningItem


class FunctionTool(BaseModel):
    """Responses' function tool: the chat tool's fields, one level up."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: free text, any JSON object, or JSON following `schema`."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {"required": ["schema"]},
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | SkipJsonSchema[None] = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('text.format of type "json_schema" needs a schema')
        return self

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        schema = JsonSchemaFormat.model_validate(
            {"name": self.name, "description": self.description, "schema": self.schema_}
        )
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


_RULES: list[Any] = [
    {  # a tool choice other than none or auto names tools
        "if": {
            "required": ["tool_choice"],
            "properties": {"tool_choice": {"not": {"enum": ["none", "auto"]}}},
        },
        "then": {"required": ["tools"], "properties": {"tools": {"minItems": 1}}},
    },
    {"properties": {"previous_response_id": {"type": "null"}}},
]


# what `include` may name: only the first adds anything here (the others are parts of items this
# server never makes)
Includable = Literal[
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
]


# an input list holds something to answer: an item other than reasoning
_ANSWERABLE: dict[str, Any] = {
    "contains": {"not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}}
}


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(
        extra="ignore", allow_inf_nan=False, json_schema_extra={"allOf": _RULES}
    )

    model: str | None = None
    input: Text | Annotated[list[InputItem], Field(min_length=1, json_schema_extra=_ANSWERABLE)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True  # accepted; nothing is stored, and the answer says `store: false`
    metadata: dict[str, str] | None = None
    user: str | None = None
    # "auto": a conversation over the context keeps its last tokens (vLLM's reading)
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: list[Includable] | None = None
    presence_penalty: Penalty | None = None  # vLLM's, as on the chat route
    frequency_penalty: Penalty | None = None
    # refused unless at their defaults (see the module's docstring); left out of /openapi.json
    previous_response_id: SkipJsonSchema[str | None] = None
    background: SkipJsonSchema[bool] = False
    # built as part of validation, which runs off the event loop for large bodies (api/body.py)
    _chat: ChatCompletionRequest | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _checks(self) -> ResponsesRequest:
        if self.previous_response_id is not None:
            raise ValueError(
                "previous_response_id needs a response store, which this server does not keep: "
                "send the earlier turns in input"
            )
        if self.background:
            raise ValueError("background responses are not supported by this server")
        if not isinstance(self.input, str) and all(
            isinstance(i, ReasoningItem) for i in self.input
        ):
            raise ValueError("input holds nothing to answer: no message, call or call output")
        if self.tool_choice == "auto" and not self.tools:
            self.tool_choice = None  # may call tools, of which there are none
        try:  # the chat request's own checks (tool_choice needs tools, ...) apply as they are
            self._chat = self._as_chat()
        except ValidationError as exc:
            errors = (e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError("; ".join(errors)) from None
        return self

    def as_chat(self) -> ChatCompletionRequest:
        """The same conversation, tools and limits as a chat request."""
        assert self._chat is not None  # built by validation
        return self._chat

    def _as_chat(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        return ChatCompletionRequest(
            model=self.model,
            messages=self._messages(),
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            tools=[
                Tool(function=FunctionDefinition(**t.model_dump(exclude={"type"})))
                for t in self.tools
            ]
            if self.tools
            else None,
            tool_choice=NamedToolChoice(function=NamedFunction(name=choice.name))
            if isinstance(choice, FunctionChoice)
            else choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=fmt.as_response_format() if fmt is not None else None,
            stream=self.stream,
            user=self.user,
            truncate_prompt_tokens=-1 if self.truncation == "auto" else None,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs if self.logprobs else None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    @property
    def logprobs(self) -> bool:
        """Logprobs on the output text: asked by `include` or by `top_logprobs`."""
        asked = "message.output_text.logprobs" in (self.include or [])
        return asked or self.top_logprobs is not None

    def _messages(self) -> list[ChatMessage]:
        """`instructions` as the system message, then `input`; a function call joins the
        assistant message before it (one turn: its text, then its calls)."""
        out = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        items = (
            [InputMessage(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        for item in items:
            if isinstance(item, InputMessage):
                out.append(item.as_chat())
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(
                    id=item.call_id,
                    function=FunctionCall(name=item.name, arguments=item.arguments),
                )
                if not out or out[-1].role != "assistant":
                    out.append(ChatMessage(role="assistant", content=None, tool_calls=[]))
                out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
            elif isinstance(item, FunctionCallOutput):
                out.append(ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id))
        return out

    def num_chars(self) -> int:
        """The conversation's characters (the template only adds to them)."""
        if isinstance(self.input, str):
            return len(self.instructions or "") + len(self.input)
        return len(self.instructions or "") + sum(i.num_chars() for i in self.input)

    def echoed(self) -> dict[str, Any]:
        """The request's settings as the response object repeats them."""
        choice = self.tool_choice
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "text": {
                "format": self.text.format.model_dump(by_alias=True, exclude_none=True)
                if self.text is not None and self.text.format is not None
                else {"type": "text"}
            },
            "tool_choice": choice.model_dump()
            if isinstance(choice, FunctionChoice)
            else choice or ("auto" if self.tools else "none"),
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "truncation": self.truncation or "disabled",
            "top_logprobs": self.top_logprobs,
            "user": self.user,
        }
