"""Every type that crosses a process boundary, as msgspec Structs encoded by field name.

Fields may be added anywhere: messages are maps, never positional arrays. A node that joins from
another machine states `WIRE_VERSION` in its hello; the head refuses any other version.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import msgspec

WIRE_VERSION = 1  # bump when a message changes meaning; nodes of other versions are refused


class FinishReason(enum.StrEnum):
    """Why a request ended; the values are the OpenAI / vLLM `finish_reason` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One constraint on a request's output, vLLM's `structured_outputs`: exactly one of a JSON
    schema (`json`, a dict or its JSON text), any JSON object (`json_object`), a regular
    expression, a list of `choice` strings, an EBNF `grammar`, or an xgrammar `structural_tag`
    (JSON text). The engine compiles it once per distinct value (the text is the cache key)."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # key order kept: it is the order properties appear in
            self.json = json.dumps(self.json)
        given = [
            k
            for k in ("json", "regex", "choice", "grammar", "structural_tag")
            if getattr(self, k) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar or structural_tag; got {', '.join(given) or 'none'}"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must list at least one string")

    @property
    def kind(self) -> str:
        """Which constraint: json, json_object, regex, choice, grammar or structural_tag."""
        if self.json_object:
            return "json_object"
        return next(
            k for k in ("json", "regex", "choice", "grammar", "structural_tag")
            if getattr(self, k) is not None
        )  # fmt: skip


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to sample one request, shaped like vLLM's. Validated on construction (ValueError)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob, and this many top ones
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None  # added to a token's logit; clamped to +-100
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    # vLLM's bad_words: never generated. Their token sequences (bad_words_token_ids) are what
    # the engine reads; whoever tokenizes (the API server, LLM) fills them in.
    bad_words: list[str] = msgspec.field(default_factory=list)
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:  # as OpenAI specifies and vLLM does
            self.logit_bias = {t: min(100.0, max(-100.0, b)) for t, b in self.logit_bias.items()}
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0, "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be -1 (disable), 0 (disable) or at least 1"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be greater than zero"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens must be less than or equal to max_tokens",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs must be in [0, 20]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def check_token_ids(self, vocab_size: int) -> None:
        """ValueError naming the field whose token ids are not below `vocab_size` (the sampler
        indexes the logits with them)."""
        if self.bad_words and self.bad_words_token_ids is None:
            raise ValueError("bad_words were not tokenized (bad_words_token_ids is unset)")
        if any(not seq for seq in self.bad_words_token_ids or ()):
            raise ValueError("bad_words_token_ids: a bad word has no tokens")
        fields = {
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": list(self.logit_bias or ()),
            "allowed_token_ids": self.allowed_token_ids or [],
            "bad_words": [t for seq in self.bad_words_token_ids or () for t in seq],
        }
        for name, ids in fields.items():
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name}: token ids must be in [0, {vocab_size}), got {bad[:5]}")


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    """A tokenized request for an engine core. `max_tokens` is resolved by the sender."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0


class TokenLogprobs(msgspec.Struct, kw_only=True):
    """Logprob of a sampled token, plus the top alternatives (ids and logprobs, best first)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = msgspec.field(default_factory=list)
    top_logprobs: list[float] = msgspec.field(default_factory=list)


class RequestTimes(msgspec.Struct, kw_only=True):
    """Engine-side milestones of a finished request, on the engine's monotonic clock (the same
    clock as every process on the host): queued, first scheduled, first token."""

    queued: float
    scheduled: float
    first_token: float
    last_token: float
    num_preemptions: int = 0


class EngineCoreOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """New tokens for one request from one engine step; `finish_reason` set on its last one."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # with the first token, if asked for: prompt tokens 1.. (the first has no logprob)
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    times: RequestTimes | None = None  # on the last output of a request that ran


class AbortRequests(msgspec.Struct, kw_only=True, tag="abort"):
    """Frontend -> engine: end these requests now (unknown ids are ignored)."""

    request_ids: list[str]


class AddRequest(msgspec.Struct, kw_only=True, tag="add"):
    """Frontend -> engine: queue one tokenized request."""

    request: EngineCoreRequest


class ApiServerHello(msgspec.Struct, kw_only=True, tag="api_hello"):
    """Frontend -> engine, when an API server (re)starts: forget the requests an earlier
    process of this API server sent, and say READY again if loaded."""

    api_index: int


EngineInput = AddRequest | AbortRequests | ApiServerHello


class EngineStats(msgspec.Struct, kw_only=True):
    """The engine's load after a step; counters are deltas since the previous message."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_scheduled_tokens: int = 0  # tokens computed in this message's step (0: no step)
    num_prompt_tokens: int = 0  # of those, prompt (prefill) tokens
    num_generation_tokens: int = 0  # tokens sampled in this step
    has_counters: bool = True  # False in copies sent to other API servers (counted once)


class EngineCoreOutputs(msgspec.Struct, kw_only=True, tag="outputs"):
    """Engine -> frontend: everything one step (or one batch of aborts) produced, plus load."""

    engine_index: int
    outputs: list[EngineCoreOutput]
    stats: EngineStats


class EngineLoading(msgspec.Struct, kw_only=True, tag="loading"):
    """Engine -> frontend while it loads: `fraction` of the weights read so far in `phase`."""

    engine_index: int
    phase: str
    fraction: float


class EngineReady(msgspec.Struct, kw_only=True, tag="ready"):
    """Engine -> frontend once, after loading: what it found (the frontend's only source)."""

    engine_index: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    dtype: str  # the weights'
    kv_cache_dtype: str  # the KV cache's (float32 on CPU whatever the weights)
    model_type: str


class EngineFailed(msgspec.Struct, kw_only=True, tag="failed"):
    """Engine -> frontend: the engine cannot go on (load error, crashed step); it then exits."""

    engine_index: int
    message: str


EngineMessage = EngineCoreOutputs | EngineLoading | EngineReady | EngineFailed


class EngineLoad(msgspec.Struct, kw_only=True, tag="load"):
    """Engine -> coordinator, whenever its counts change (add, finish, abort, preempt; requests
    still in its inbox count as waiting) and every heartbeat interval otherwise."""

    engine_index: int
    num_waiting: int
    num_running: int
    kv_cache_usage: float


class LoadVector(msgspec.Struct, kw_only=True, tag="vector"):
    """Coordinator -> every API server: the last load of every engine, by global rank.

    `lost[e]` is true once engine e, having reported, went silent for longer than the
    coordinator's heartbeat timeout (its node or process is gone); `failed[e]` once its node
    said it is out of restarts."""

    seq: int
    waiting: list[int]
    running: list[int]
    kv_cache_usage: list[float]
    lost: list[bool]
    failed: list[bool] = msgspec.field(default_factory=list)


class NodeHello(msgspec.Struct, kw_only=True, tag="hello"):
    """Headless node -> head's coordinator: "I run ranks start_rank .. start_rank+local_size-1"."""

    version: int
    data_parallel_size: int
    start_rank: int
    local_size: int
    hostname: str = ""


class NodeRanksFailed(msgspec.Struct, kw_only=True, tag="ranks_failed"):
    """Headless node -> head: these ranks are out of restarts and stay down."""

    ranks: list[int]
    reason: str


class NodeWelcome(msgspec.Struct, kw_only=True, tag="welcome"):
    """Head -> headless node: where its engines connect (every API server, and the coordinator)."""

    api_inputs: list[str]
    api_outputs: list[str]
    coordinator_input: str


class NodeRefused(msgspec.Struct, kw_only=True, tag="refused"):
    """Head -> headless node: it may not join, and why (the node exits with this message)."""

    reason: str


class HeadHeartbeat(msgspec.Struct, kw_only=True, tag="heartbeat"):
    """Head -> headless node, every second: the head is alive."""


class NodeShutdown(msgspec.Struct, kw_only=True, tag="shutdown"):
    """Head -> headless node: the head is stopping; stop the engines and exit 0."""


HeadMessage = NodeWelcome | NodeRefused | HeadHeartbeat | NodeShutdown
