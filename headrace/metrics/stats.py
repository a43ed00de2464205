"""The periodic stats log line (`--log-stats-interval`), shaped like vLLM's.

Accumulates per-engine step counters as messages arrive (plain numbers, no Prometheus), and every
interval logs one line per engine:

    Engine 000: Avg prompt throughput: 812.3 tokens/s, Avg generation throughput: 301.2 tokens/s,
    Running: 64 reqs, Waiting: 0 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 3.1%
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from headrace.wire.messages import EngineCoreOutputs, EngineStats

logger = logging.getLogger("headrace.stats")


@dataclass(slots=True)
class _Window:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    last: EngineStats = field(default_factory=EngineStats)


class StatsLogger:
    """Per-engine totals since the last line."""

    def __init__(self, num_engines: int) -> None:
        self.windows = [_Window() for _ in range(num_engines)]
        self.since = time.monotonic()

    def record(self, msg: EngineCoreOutputs) -> None:
        w = self.windows[msg.engine_index]
        s = msg.stats
        w.last = s
        if s.has_counters:
            w.prompt_tokens += s.num_prompt_tokens
            w.generation_tokens += s.num_generation_tokens
            w.prefix_queries += s.prefix_cache_queries
            w.prefix_hits += s.prefix_cache_hits

    def lines(self) -> list[str]:
        """One line per engine for the window that ends now; starts a new window."""
        now = time.monotonic()
        elapsed = max(1e-9, now - self.since)
        self.since = now
        out = []
        for i, w in enumerate(self.windows):
            hit_rate = 100.0 * w.prefix_hits / w.prefix_queries if w.prefix_queries else 0.0
            out.append(
                f"Engine {i:03d}: Avg prompt throughput: {w.prompt_tokens / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {w.generation_tokens / elapsed:.1f} tokens/s, "
                f"Running: {w.last.num_running} reqs, Waiting: {w.last.num_waiting} reqs, "
                f"KV cache usage: {100.0 * w.last.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {hit_rate:.1f}%"
            )
            self.windows[i] = _Window(last=w.last)
        return out

    def log(self) -> None:
        for line in self.lines():
            logger.info(line)
