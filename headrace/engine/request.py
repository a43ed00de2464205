"""The engine's mutable view of one request: tokens so far, KV blocks, progress, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from headrace.engine.structured import GrammarState
from headrace.wire.messages import EngineCoreRequest, FinishReason, SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    """One sequence inside the engine.

    Invariant: `num_computed_tokens <= num_tokens`; the KV of tokens `[0, num_computed_tokens)` is
    in `block_ids`. A request samples when a step brings `num_computed_tokens` to `num_tokens`.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float = 0.0
    all_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_published_blocks: int = 0  # leading blocks of block_ids already offered to the prefix cache
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None  # structured output: masks its logits every step
    # prompt logprobs so far, for prompt tokens 1, 2, ... (sent with the first output token)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    queued_time: float = 0.0  # engine monotonic clock
    scheduled_time: float | None = None
    first_token_time: float | None = None

    @classmethod
    def from_wire(cls, msg: EngineCoreRequest, max_tokens: int) -> Request:
        req = cls(
            request_id=msg.request_id,
            prompt_token_ids=list(msg.prompt_token_ids),
            params=msg.sampling_params,
            max_tokens=max_tokens,
            arrival_time=msg.arrival_time,
        )
        req.all_token_ids = list(req.prompt_token_ids)
        if msg.sampling_params.seed is not None:
            req.generator = torch.Generator().manual_seed(msg.sampling_params.seed)
        return req

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
