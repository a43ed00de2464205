"""Frozen configuration, built once (CLI or `LLM`); each component gets only its slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which weights to load and how. `model=None` means the bundled SmolLM2-135M-Instruct."""

    model: str | None = None
    dtype: DType = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int = 0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache shape; block count from `num_kv_blocks`, else `kv_cache_memory` bytes."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 2 << 30
    enable_prefix_caching: bool = True


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous-batching limits: sequences per step and tokens per step (the prefill chunk)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine core needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.cache.block_size < 1 or self.cache.block_size & (self.cache.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.cache.block_size}")
        if self.scheduler.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.scheduler.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.cache.num_kv_blocks is not None and self.cache.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What an API server process needs (engine settings travel separately, to engines)."""

    model: str | None = None
    served_model_names: tuple[str, ...] = ("SmolLM2-135M-Instruct",)
    host: str | None = None
    port: int = 8000
    api_key: str | None = None
    disable_log_requests: bool = False
    disable_access_log_for_endpoints: tuple[str, ...] = ()
    api_server_count: int = 1
    data_parallel_size: int = 1
    max_request_body_bytes: int = 64 << 20
    shutdown_timeout: float = 30.0
    engine_stall_timeout: float = 60.0
    metrics_namespace: str = "vllm"
    log_stats_interval: float = 10.0
    disable_log_stats: bool = False
    max_num_queued_requests: int | None = None
    enable_prefix_caching: bool = True
    uvicorn_log_level: str = "info"
