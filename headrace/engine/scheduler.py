"""Continuous batching: which requests run this step and how many tokens each computes.

Policy (FCFS): running requests first, oldest first, each taking what it needs (1 token for a
decode, a chunk of its prompt while prefilling) from the step's token budget. When the KV cache is
full, the newest running request is preempted (its blocks freed, recomputed later from scratch;
outputs are unchanged). Waiting requests are admitted in arrival order while budget, sequence
slots and blocks last; the first that does not fit blocks the rest.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from headrace.config import SchedulerConfig
from headrace.engine.kv_cache import KVCacheManager
from headrace.engine.request import Request, RequestStatus
from headrace.wire.messages import (
    EngineCoreOutput,
    EngineStats,
    FinishReason,
    RequestTimes,
    TokenLogprobs,
)


@dataclass(slots=True)
class SchedulePlan:
    """One step's work: `num_new_tokens[i]` tokens of `requests[i]` from its computed count."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    failed: list[EngineCoreOutput] = field(default_factory=list)  # grammars that did not compile

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, req: Request, num_tokens: int) -> None:
        self.requests.append(req)
        self.num_new_tokens.append(num_tokens)


@dataclass(slots=True)
class RunnerOutput:
    """What the model runner sampled, keyed by request id (only requests that sampled)."""

    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # this step's prompt logprobs of the requests that asked, in prompt order
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class Scheduler:
    """Owns every live request and the KV block accounting; never touches tensors."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int],
    ) -> None:
        self.cfg = cfg
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._prefix_queries = self._prefix_hits = self._preemptions = 0

    # -- requests in and out -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in the engine")
        req.queued_time = time.monotonic()
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish the named requests as aborted (unknown ids are ignored: they already ended)."""
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, FinishReason.ABORT)
            outputs.append(
                EngineCoreOutput(
                    request_id=rid,
                    new_token_ids=[],
                    finish_reason=FinishReason.ABORT,
                    times=_times(req),
                )
            )
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan()
        budget = self.cfg.max_num_batched_tokens
        preempted = self._schedule_running(plan, budget)
        if not preempted:
            self._schedule_waiting(plan, budget - plan.total_tokens)
        return plan

    def _schedule_running(self, plan: SchedulePlan, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                plan.add(req, n)
                budget -= n
                i += 1
        return preempted

    def blocked_on_grammars(self) -> bool:
        """Nothing runs and every waiting request's grammar is still compiling."""
        return not self.running and all(
            r.grammar is not None and not r.grammar.ready for r in self.waiting
        )

    def _schedule_waiting(self, plan: SchedulePlan, budget: int) -> None:
        compiling: list[Request] = []  # skipped, not blocking: they keep their place in line
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if req.grammar is not None and not req.grammar.ready:
                compiling.append(self.waiting.popleft())
                continue
            if req.grammar is not None and req.grammar.error is not None:
                self.waiting.popleft()
                plan.failed.append(self._fail(req, req.grammar.error))
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, num_hit + n, hit_blocks):
                return
            self.waiting.popleft()
            self._prefix_queries += req.num_tokens
            self._prefix_hits += num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if req.scheduled_time is None:
                req.scheduled_time = time.monotonic()
            self.running.append(req)
            plan.add(req, n)
            budget -= n
        self.waiting.extendleft(reversed(compiling))

    def _fail(self, req: Request, message: str) -> EngineCoreOutput:
        self._finish(req, FinishReason.ERROR)
        return EngineCoreOutput(
            request_id=req.request_id,
            new_token_ids=[],
            finish_reason=FinishReason.ERROR,
            stop_reason=message,
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self._preemptions += 1
        self.waiting.appendleft(req)

    def update(self, plan: SchedulePlan, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance every scheduled request; append sampled tokens; finish what has to stop."""
        outputs = []
        for req, n in zip(plan.requests, plan.num_new_tokens, strict=True):
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req)
            req.prompt_logprobs.extend(result.prompt_logprobs.get(req.request_id, ()))
            token = result.sampled.get(req.request_id)
            if token is None:
                continue  # a prompt chunk that does not reach the end of the sequence
            first = not req.output_token_ids
            req.append_output(token)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            reason = self._stop_reason(req, token)
            logprobs = result.logprobs.get(req.request_id)
            out = EngineCoreOutput(
                request_id=req.request_id,
                new_token_ids=[token],
                new_logprobs=[logprobs] if logprobs is not None else None,
                num_cached_tokens=req.num_cached_tokens,
            )
            if first and req.params.prompt_logprobs is not None:
                out.prompt_logprobs = req.prompt_logprobs
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
                out.finish_reason = reason
                out.stop_reason = req.stop_reason
                out.times = _times(req)
            outputs.append(out)
        return outputs

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        params = req.params
        num_out = len(req.output_token_ids)
        if req.grammar is not None and req.grammar.ends_with(token):
            return FinishReason.STOP
        if num_out >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                req.stop_reason = token
                return FinishReason.STOP
        if num_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

    def stats(self, num_scheduled_tokens: int = 0) -> EngineStats:
        """Load now, plus counters since the previous call (sent with every step's outputs)."""
        out = EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            num_preemptions=self._preemptions,
            num_scheduled_tokens=num_scheduled_tokens,
        )
        self._prefix_queries = self._prefix_hits = self._preemptions = 0
        return out


def _times(req: Request) -> RequestTimes:
    now = time.monotonic()
    scheduled = req.scheduled_time if req.scheduled_time is not None else now
    first = req.first_token_time if req.first_token_time is not None else now
    return RequestTimes(
        queued=req.queued_time,
        scheduled=scheduled,
        first_token=first,
        last_token=now,
        num_preemptions=req.num_preemptions,
    )
