"""Small builders for engine unit tests: requests, schedulers and a fake model runner."""

from __future__ import annotations

import itertools
import random

from headrace.config import SchedulerConfig
from headrace.engine.kv_cache import KVCacheManager
from headrace.engine.request import Request
from headrace.engine.scheduler import RunnerOutput, SchedulePlan, Scheduler
from headrace.wire.messages import EngineCoreRequest, SamplingParams

EOS = 0
_ids = itertools.count()


def make_request(prompt: list[int] | int, max_tokens: int = 8, **params: object) -> Request:
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    params.setdefault("temperature", 0.0)
    sp = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    msg = EngineCoreRequest(
        request_id=f"r{next(_ids)}", prompt_token_ids=tokens, sampling_params=sp
    )
    return Request.from_wire(msg, max_tokens)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 256,
    prefix_caching: bool = True,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    return Scheduler(
        SchedulerConfig(max_num_seqs, max_num_batched_tokens), kv, max_model_len, [EOS]
    )


class FakeRunner:
    """Samples a deterministic non-EOS token (or EOS with probability `eos_rate`)."""

    def __init__(self, eos_rate: float = 0.0, seed: int = 0, block_size: int = 4) -> None:
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.eos_rate = eos_rate
        self.plans: list[SchedulePlan] = []

    def execute(self, plan: SchedulePlan) -> RunnerOutput:
        self.plans.append(plan)
        sampled = {}
        for req, n in zip(plan.requests, plan.num_new_tokens, strict=True):
            # The scheduler must have given every token it plans a KV slot.
            assert len(req.block_ids) * self.block_size >= req.num_computed_tokens + n
            if req.num_computed_tokens + n == req.num_tokens:
                eos = self.rng.random() < self.eos_rate
                sampled[req.request_id] = EOS if eos else 100 + req.num_tokens
        return RunnerOutput(sampled=sampled)


def run_step(sched: Scheduler, runner: FakeRunner) -> list:
    plan = sched.schedule()
    if plan.is_empty:
        return []
    return sched.update(plan, runner.execute(plan))
