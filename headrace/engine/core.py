"""EngineCore: the synchronous, socket-free engine. `step()` is schedule -> execute -> update."""

from __future__ import annotations

import logging

from headrace.config import EngineConfig
from headrace.engine.kv_cache import KVCacheManager
from headrace.engine.model_runner import ModelRunner, RunnerInfo
from headrace.engine.request import Request
from headrace.engine.scheduler import Scheduler
from headrace.model.loader import ProgressFn
from headrace.wire.messages import EngineCoreOutput, EngineCoreRequest, EngineStats

logger = logging.getLogger(__name__)


class EngineCore:
    """Runs the model over the requests it holds; knows nothing of sockets or processes."""

    def __init__(self, config: EngineConfig, progress: ProgressFn | None = None) -> None:
        self.config = config
        self.runner = ModelRunner(config.model, config.cache, progress)
        info = self.runner.info
        self.kv = KVCacheManager(
            info.num_kv_blocks, info.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler, self.kv, info.max_model_len, info.eos_token_ids
        )
        self._step_tokens = self._step_prompt_tokens = self._step_generated = 0

    @property
    def info(self) -> RunnerInfo:
        return self.runner.info

    def add_request(self, msg: EngineCoreRequest) -> None:
        """Queue a tokenized request. Raises ValueError if it can never fit."""
        max_len = self.runner.max_model_len
        num_prompt = len(msg.prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= max_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens; this model's maximum context length is "
                f"{max_len} tokens, which must also leave room for at least one output token"
            )
        vocab = self.runner.arch.vocab_size
        if any(not 0 <= t < vocab for t in msg.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        msg.sampling_params.check_token_ids(vocab)
        room = max_len - num_prompt
        requested = msg.sampling_params.max_tokens
        max_tokens = room if requested is None else min(requested, room)
        req = Request.from_wire(msg, max_tokens)
        spec = msg.sampling_params.structured_outputs
        if spec is not None:
            req.grammar = self.runner.grammars.attach(spec)
        self.scheduler.add_request(req)

    def abort(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def blocked(self) -> bool:
        """Every request waits for its grammar to compile: a step now would do nothing."""
        return self.scheduler.blocked_on_grammars()

    def step(self) -> list[EngineCoreOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return plan.failed
        self._step_tokens = plan.total_tokens
        self._step_prompt_tokens = sum(
            max(0, min(n, r.num_prompt_tokens - r.num_computed_tokens))
            for r, n in zip(plan.requests, plan.num_new_tokens, strict=True)
        )
        result = self.runner.execute(plan)
        self._step_generated = len(result.sampled)
        return plan.failed + self.scheduler.update(plan, result)

    def stats(self) -> EngineStats:
        """Load now; counters since the last call (tokens of the last step, if not reported)."""
        stats = self.scheduler.stats(self._step_tokens)
        stats.num_prompt_tokens, stats.num_generation_tokens = (
            self._step_prompt_tokens,
            self._step_generated,
        )
        self._step_tokens = self._step_prompt_tokens = self._step_generated = 0
        return stats
