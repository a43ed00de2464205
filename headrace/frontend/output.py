"""Engine outputs -> per-request deltas: incremental detokenization, stop strings, timings.

One API request with `n` choices (or several prompts) owns one `RequestStream`; each choice is one
engine request (`SeqState`). A step's outputs are handled in one pass; a stop string found here
ends the sequence at once and is returned so the client aborts it in the engine (freeing blocks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from headrace.frontend.detokenize import IncrementalDetokenizer
from headrace.frontend.queue_board import QueueRow, local_row
from headrace.wire.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    RequestTimes,
    SamplingParams,
    TokenLogprobs,
)


class EngineError(RuntimeError):
    """The engine could not finish a request (it died, stalled, or refused the request).
    `retryable`: the server lost it to a failure it is recovering from (503 + Retry-After)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(slots=True)
class SeqDelta:
    """What one engine step added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    restart: bool = False  # the choice starts over (re-sent): drop what came before
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., on the first delta


@dataclass(slots=True)
class Choice:
    """A choice accumulated from its deltas (non-streaming answers, the offline `LLM`)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None

    def add(self, d: SeqDelta) -> None:
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason


def fan_out(
    request_id: str, prompts: list[list[int]], params: SamplingParams, arrival_time: float
) -> list[tuple[int, EngineCoreRequest]]:
    """The engine requests of one API request: `n` per prompt, choice index = prompt * n + j,
    engine request id `{request_id}-{index}`; with a seed, choice j samples with seed + j (so
    the `n` choices differ, and each is reproducible)."""
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(params.n):
            child = params
            if params.n > 1 and params.seed is not None:
                child = msgspec.structs.replace(params, seed=params.seed + j)
            index = p * params.n + j
            msg = EngineCoreRequest(
                request_id=f"{request_id}-{index}",
                prompt_token_ids=prompt,
                sampling_params=child,
                arrival_time=arrival_time,
            )
            out.append((index, msg))
    return out


@dataclass(slots=True)
class SeqState:
    """One choice = one engine request, as the frontend tracks it."""

    request_id: str
    index: int
    engine_index: int
    detok: IncrementalDetokenizer
    stream: RequestStream
    want_logprobs: bool
    prompt_len: int = 0
    max_tokens: int = 0  # resolved: what the engine may generate at most
    params_max_tokens: int | None = None  # as the client asked
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    times: RequestTimes | None = None  # engine milestones, on the last output
    finished: bool = False
    held_token_ids: list[int] = field(default_factory=list)  # generated, not yet in a delta
    held_prompt_logprobs: list[TokenLogprobs] | None = None  # the same, for prompt logprobs
    wire: EngineCoreRequest | None = None  # as sent, to re-send if its engine is lost
    pinned: bool = False  # sent to a rank the client named: never re-sent elsewhere
    resent: bool = False
    prefilling: bool = True  # no output token yet: its prompt is in the prefill backlog


@dataclass(eq=False)
class RequestStream:
    """Deltas of every choice of one API request, in arrival order; iterate until all finish."""

    request_id: str
    prompt_token_ids: list[list[int]]
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[SeqState] = field(default_factory=list)
    num_cached_tokens: int = 0
    streaming: bool = True  # False: nothing reaches the client before the end (re-sendable)
    queue: asyncio.Queue[SeqDelta | BaseException] = field(default_factory=asyncio.Queue)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    async def __aiter__(self) -> AsyncIterator[SeqDelta]:
        remaining = len(self.seqs)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item


def new_detokenizer(
    tokenizer: Any, prompt: list[int], params: SamplingParams
) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(
        tokenizer,
        prompt,
        params.skip_special_tokens,
        params.stop,
        params.include_stop_str_in_output,
    )


class RequestObserver(Protocol):
    """What metrics see of a choice's life (all times on this host's monotonic clock)."""

    def first_token(self, seq: SeqState, ttft: float) -> None: ...

    def generated(self, engine_index: int, num_tokens: int) -> None: ...

    def next_token(self, seq: SeqState, gap: float) -> None: ...

    def finished(self, seq: SeqState, reason: str, now: float) -> None: ...

    def engine_times(self, seq: SeqState, times: RequestTimes) -> None: ...

    def recovery(self, engine_index: int, resent: bool) -> None: ...


class OutputProcessor:
    """Every live choice of this API server, by engine request id."""

    def __init__(
        self, observer: RequestObserver | None = None, counts: QueueRow | None = None
    ) -> None:
        self.seqs: dict[str, SeqState] = {}
        self.observer = observer
        self.counts = counts or local_row()  # what admission control sees of this server
        # Choices ended here (stop string, client gone) whose engine milestones still come with
        # the engine's abort output.
        self.awaiting_times: dict[str, SeqState] = {}

    def add(self, seq: SeqState) -> None:
        self.seqs[seq.request_id] = seq
        seq.stream.seqs.append(seq)
        self.counts.sent(seq.prompt_len)

    def num_in_flight(self, engine_index: int) -> int:
        return sum(1 for s in self.seqs.values() if s.engine_index == engine_index)

    def process(self, outputs: list[EngineCoreOutput]) -> list[str]:
        """Turn one step's outputs into deltas; return ids a stop string ended (to abort)."""
        to_abort: list[str] = []
        now = time.monotonic()
        engine_index, generated = -1, 0
        for out in outputs:
            seq = self.seqs.get(out.request_id)
            if seq is None:  # ended here already (stop string, client gone)
                if out.finish_reason is not None:  # the engine's last word on it
                    late = self.awaiting_times.pop(out.request_id, None)
                    if late is not None and out.times is not None and self.observer is not None:
                        self.observer.engine_times(late, out.times)
                continue
            if out.finish_reason is FinishReason.ERROR:
                self._end(seq, FinishReason.ERROR)
                seq.stream.queue.put_nowait(EngineError(str(out.stop_reason or "engine error")))
                continue
            if out.new_token_ids:
                self._timing(seq, now)
                engine_index = seq.engine_index
                generated += len(out.new_token_ids)
            seq.num_output_tokens += len(out.new_token_ids)
            seq.num_cached_tokens = out.num_cached_tokens
            seq.stream.num_cached_tokens = max(seq.stream.num_cached_tokens, out.num_cached_tokens)
            if out.times is not None:
                seq.times = out.times
            stopped = seq.detok.add_tokens(out.new_token_ids)
            reason: str | None = None
            stop_reason = out.stop_reason
            if stopped:
                reason, stop_reason = FinishReason.STOP.value, seq.detok.stopped_by
                if out.finish_reason is None:
                    to_abort.append(seq.request_id)
            elif out.finish_reason is not None:
                seq.detok.flush()
                reason = out.finish_reason.value
            text = seq.detok.take_new_text(finished=reason is not None)
            token_ids = seq.held_token_ids + out.new_token_ids
            prompt_logprobs = out.prompt_logprobs or seq.held_prompt_logprobs
            if reason is not None:
                self._end(seq, reason)
            elif not text and not seq.want_logprobs:
                # nothing a client could see (half a character, a held-back stop prefix): its
                # tokens go out with the next delta, so usage counts every one
                seq.held_token_ids = token_ids
                seq.held_prompt_logprobs = prompt_logprobs
                continue
            seq.held_token_ids, seq.held_prompt_logprobs = [], None
            seq.stream.queue.put_nowait(
                SeqDelta(
                    seq.index,
                    text,
                    token_ids,
                    out.new_logprobs if seq.want_logprobs else None,
                    reason,
                    stop_reason,
                    prompt_logprobs=prompt_logprobs,
                )
            )
        if generated and self.observer is not None:  # one message = one engine's step
            self.observer.generated(engine_index, generated)
        return to_abort

    def _timing(self, seq: SeqState, now: float) -> None:
        if seq.prefilling:
            seq.prefilling = False
            self.counts.prefilled(seq.prompt_len)
        if seq.first_token_time is None:
            seq.first_token_time = now
            if self.observer is not None:
                self.observer.first_token(seq, now - seq.stream.arrival_time)
        elif self.observer is not None and seq.last_token_time is not None:
            self.observer.next_token(seq, now - seq.last_token_time)
        seq.last_token_time = now

    def _end(self, seq: SeqState, reason: str) -> None:
        if not seq.finished:
            self.counts.ended(seq.prompt_len, seq.prefilling)
        seq.finished = True
        self.seqs.pop(seq.request_id, None)
        if self.observer is not None:
            self.observer.finished(seq, reason, time.monotonic())
            if seq.times is None and reason != FinishReason.ERROR:
                self.awaiting_times[seq.request_id] = seq

    def forget(self, request_ids: list[str]) -> None:
        """Drop choices whose client went away (the engine is told separately)."""
        for rid in request_ids:
            seq = self.seqs.get(rid)
            if seq is not None:
                self._end(seq, FinishReason.ABORT)

    def abort_all(self) -> dict[int, list[str]]:
        """End every live choice with finish_reason `abort` (shutdown); ids by engine."""
        by_engine: dict[int, list[str]] = {}
        for seq in list(self.seqs.values()):
            by_engine.setdefault(seq.engine_index, []).append(seq.request_id)
            seq.detok.flush()
            text = seq.detok.take_new_text(finished=True)
            self._end(seq, FinishReason.ABORT)
            seq.stream.queue.put_nowait(
                SeqDelta(seq.index, text, seq.held_token_ids, None, FinishReason.ABORT.value)
            )
        return by_engine

    def on_engine(self, engine_index: int) -> list[SeqState]:
        """Every live choice on one engine, and forget the milestones it still owed us."""
        for rid, seq in list(self.awaiting_times.items()):
            if seq.engine_index == engine_index:
                del self.awaiting_times[rid]
        return [s for s in self.seqs.values() if s.engine_index == engine_index]

    def restart(
        self, seq: SeqState, request_id: str, engine_index: int, detok: IncrementalDetokenizer
    ) -> None:
        """`seq` starts over under a new id on another engine (its old engine is gone)."""
        self.seqs.pop(seq.request_id, None)
        if seq.num_output_tokens:  # only a non-streaming choice: the client saw none of it
            seq.stream.queue.put_nowait(SeqDelta(seq.index, "", [], restart=True))
        seq.request_id, seq.engine_index, seq.detok = request_id, engine_index, detok
        seq.num_output_tokens = seq.num_cached_tokens = 0
        seq.times, seq.resent, seq.held_token_ids = None, True, []
        if not seq.prefilling:
            seq.prefilling = True
            self.counts.requeued(seq.prompt_len)
        self.seqs[request_id] = seq
        if self.observer is not None:
            self.observer.recovery(engine_index, resent=True)

    def lose(self, seq: SeqState, error: EngineError) -> None:
        """End one choice with an error its client sees (its engine is gone)."""
        self._end(seq, FinishReason.ERROR)
        seq.stream.queue.put_nowait(error)
        if self.observer is not None:
            self.observer.recovery(seq.engine_index, resent=False)
