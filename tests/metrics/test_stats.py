"""Unit tests of the metrics helpers (no server)."""

from __future__ import annotations

import re

from headrace.metrics.prometheus import token_buckets
from headrace.metrics.stats import StatsLogger
from headrace.wire.messages import EngineCoreOutputs, EngineStats


def test_token_buckets_are_1_2_5_up_to_max_model_len() -> None:
    assert token_buckets(8192) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    assert token_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert token_buckets(1) == [1]


def _msg(engine: int, **stats: float) -> EngineCoreOutputs:
    return EngineCoreOutputs(
        engine_index=engine,
        outputs=[],
        stats=EngineStats(**stats),  # type: ignore[arg-type]
    )


def test_stats_line_reads_like_vllms() -> None:
    log = StatsLogger(num_engines=2)
    first = _msg(
        0, num_prompt_tokens=100, num_generation_tokens=10, prefix_cache_queries=100,
        prefix_cache_hits=25, num_running=3, num_waiting=1, kv_cache_usage=0.125,
    )  # fmt: skip
    log.record(first)
    log.record(_msg(0, num_generation_tokens=10, num_running=3, has_counters=True))
    log.record(_msg(1, num_generation_tokens=99, has_counters=False))  # a copy: not counted
    lines = log.lines()
    pattern = (
        r"Engine 000: Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: "
        r"[\d.]+ tokens/s, Running: 3 reqs, Waiting: 0 reqs, KV cache usage: 0.0%, "
        r"Prefix cache hit rate: 25.0%"
    )
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert "Avg generation throughput: 0.0 tokens/s" in lines[1]
    assert "Prefix cache hit rate: 0.0%" in log.lines()[0]  # a new window starts empty
