"""HTTP request bodies (pydantic, only at the HTTP boundary) and their conversion to wire params.

Field names and ranges follow the OpenAI API plus vLLM's extra sampling fields. Unknown fields are
ignored, as vLLM does, so clients written for other servers keep working.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from headrace.config import SamplingDefaults
from headrace.wire.messages import SamplingParams, StructuredOutputsParams

T = TypeVar("T", int, float)
NO_DEFAULTS = SamplingDefaults()

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Text = Annotated[str, Field(min_length=1)]
INT32_MAX = 2**31 - 1  # counts and ids beyond this could not be served (or encoded) anyway
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # /openapi.json: below the vocabulary size
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
MAX_BAD_WORDS = 1024  # each is checked against every step's output: a bound on that work


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


_ONE_CONSTRAINT: dict[str, Any] = {
    "oneOf": [
        *({"required": [k]} for k in ("json", "regex", "choice", "grammar", "structural_tag")),
        {"required": ["json_object"], "properties": {"json_object": {"const": True}}},
    ]
}


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint on the output."""

    # extra="ignore": vLLM's disable_fallback, whitespace_pattern, ... mean nothing here
    model_config = ConfigDict(extra="ignore", json_schema_extra=_ONE_CONSTRAINT)

    json_: dict[str, Any] | str | SkipJsonSchema[None] = Field(default=None, alias="json")
    json_object: bool | SkipJsonSchema[None] = None
    regex: Text | SkipJsonSchema[None] = None
    choice: Annotated[list[str], Field(min_length=1)] | SkipJsonSchema[None] = None
    grammar: Text | SkipJsonSchema[None] = None
    structural_tag: Text | SkipJsonSchema[None] = None
    disable_any_whitespace: bool = False

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_,
            json_object=bool(self.json_object),
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            structural_tag=self.structural_tag,
            disable_any_whitespace=self.disable_any_whitespace,
        )


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | SkipJsonSchema[None] = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["json_schema"],
                "properties": {"json_schema": {"type": "object", "required": ["schema"]}},
            },
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema')
        return self

    def params(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            assert self.json_schema is not None and self.json_schema.schema_ is not None
            return StructuredOutputsParams(json=self.json_schema.schema_)
        return None


_TEXT_ONLY = {"properties": {"response_format": {"properties": {"type": {"const": "text"}}}}}
# Rules across fields, as the validators enforce them, for /openapi.json.
_SAMPLING_RULES: list[Any] = [
    {
        "if": {
            "required": ["stream_options"],
            "properties": {"stream_options": {"type": "object"}},
        },
        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
    },
    {"if": {"required": ["structured_outputs"]}, "then": _TEXT_ONLY},  # one constraint at most
]
# Not described above, though the validators enforce it: prompt_logprobs with stream (a 400, as
# in vLLM). One more if/then here and schemathesis' schema canonicalizer gives up on the chat
# request's schema.
_COMPLETION_RULES: list[Any] = [
    *_SAMPLING_RULES,
    {  # max_tokens 0 echoes the prompt alone
        "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
        "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
    },
]
_CHAT_RULES: list[Any] = [
    *_SAMPLING_RULES,
    {
        "if": {
            "required": ["tool_choice"],
            "properties": {"tool_choice": {"not": {"const": "none"}}},
        },
        "then": {"required": ["tools"]},
    },
    {  # required and named tool choices are constraints themselves
        "if": {
            "required": ["tool_choice"],
            "properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
        },
        "then": {"not": {"required": ["structured_outputs"]}, **_TEXT_ONLY},
    },
    {
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    },
]


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,
        json_schema_extra={"allOf": _SAMPLING_RULES},
    )

    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    truncate_prompt_tokens: Literal[-1] | Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's
    bad_words: Annotated[list[str], Field(max_length=MAX_BAD_WORDS)] | None = None  # vLLM's
    return_token_ids: bool = False  # vLLM's: token ids beside the text
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"
    # vLLM's, accepted only at their defaults (no beam search, no priority scheduling); left
    # out of /openapi.json
    use_beam_search: SkipJsonSchema[bool] = False
    priority: SkipJsonSchema[int] = 0
    logit_bias: dict[Annotated[str, Field(pattern=r"^\s*[0-9]+\s*$")], float] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    user: str | None = None
    data_parallel_rank: int | None = None  # vLLM's: pin to this engine (as X-data-parallel-rank)
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
    # vLLM's older names for structured_outputs' fields (still sent by many clients; left out
    # of /openapi.json, which describes the current names)
    guided_json: SkipJsonSchema[dict[str, Any] | str | None] = None
    guided_regex: SkipJsonSchema[str | None] = None
    guided_choice: SkipJsonSchema[list[str] | None] = None
    guided_grammar: SkipJsonSchema[str | None] = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available when stream is true")
        if self.use_beam_search:
            raise ValueError("beam search is not supported by this server")
        if self.priority != 0:
            raise ValueError("priority must be 0: this server schedules first come, first served")
        return self

    def token_namer(self, token_text: Callable[[int], str]) -> Callable[[int], str]:
        """How logprobs name a token: its text, or vLLM's "token_id:N" when asked."""
        if self.return_tokens_as_token_ids:
            return lambda t: f"token_id:{t}"
        return token_text

    def constraint(self) -> tuple[str, StructuredOutputsParams] | None:
        """The output constraint the request asks for and the field that names it; several at
        once are a ValueError (400)."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        if self.structured_outputs is not None:
            found.append(("structured_outputs", self.structured_outputs.params()))
        if self.response_format is not None and (rf := self.response_format.params()) is not None:
            found.append(("response_format", rf))
        guided = {
            "guided_json": StructuredOutputsParams(json=self.guided_json)
            if self.guided_json is not None else None,
            "guided_regex": StructuredOutputsParams(regex=self.guided_regex)
            if self.guided_regex is not None else None,
            "guided_choice": StructuredOutputsParams(choice=self.guided_choice)
            if self.guided_choice is not None else None,
            "guided_grammar": StructuredOutputsParams(grammar=self.guided_grammar)
            if self.guided_grammar is not None else None,
        }  # fmt: skip
        found.extend((k, v) for k, v in guided.items() if v is not None)
        if len(found) > 1:
            raise ValueError(
                "only one output constraint per request: got " + ", ".join(k for k, _ in found)
            )
        return found[0] if found else None

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: SamplingDefaults = NO_DEFAULTS,
    ) -> SamplingParams:
        """The wire params; a field left out takes `defaults`' value (the model's), else the
        API's default."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        d = defaults
        return SamplingParams(
            n=self.n,
            temperature=_first(self.temperature, d.temperature, 1.0),
            top_p=_first(self.top_p, d.top_p, 1.0),
            top_k=_first(self.top_k, d.top_k, 0),
            min_p=_first(self.min_p, d.min_p, 0.0),
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=_first(self.repetition_penalty, d.repetition_penalty, 1.0),
            max_tokens=max_tokens if max_tokens is not None else d.max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            structured_outputs=c[1] if (c := self.constraint()) else None,
            logit_bias={int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=list(self.bad_words or []),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """vLLM's `continuous_usage_stats` (with `include_usage`): usage so far in every chunk."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats


def _first(given: T | None, default: T | None, fallback: T) -> T:
    if given is not None:
        return given
    return default if default is not None else fallback


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": _COMPLETION_RULES})

    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: int | None = Field(default=16, ge=0, le=INT32_MAX)  # 0: with echo only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)
    add_special_tokens: bool = True

    @property
    def num_prompts(self) -> int:
        """A string or one list of token ids is one prompt; a list of them is several."""
        p = self.prompt
        return 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (no server-side ranking of choices)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo: the prompt alone)")
        return self

    @property
    def echo_only(self) -> bool:
        """OpenAI's echo with max_tokens 0: the prompt (and its logprobs), nothing generated."""
        return self.echo and self.max_tokens == 0

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        """vLLM's rule: `prompt_logprobs` if given, else with echo, as many as `logprobs`."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:  # templates read arguments as a mapping (vLLM's convention)
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {
                        "name": c.function.name,
                        "arguments": _loads(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        return out

    def num_chars(self) -> int:
        if isinstance(self.content, list):
            return sum(len(p.text) for p in self.content)
        return len(self.content or "")


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": _CHAT_RULES})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[Tool], Field(min_length=1)] | SkipJsonSchema[None] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | SkipJsonSchema[None] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice other than none needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in self.tools or []
        }:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """POST /tokenize: either `prompt` or chat `messages`."""

    # exactly one of prompt and messages (the schema says so, and does not offer null)
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]},
    )

    model: str | None = None
    prompt: str | SkipJsonSchema[None] = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | SkipJsonSchema[None] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenId]
