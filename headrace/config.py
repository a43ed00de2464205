"""Frozen configuration, built once (CLI or `LLM`); each component gets only its slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDType = Literal["auto", "bfloat16", "fp8_e4m3", "fp8_e5m2"]


def dtype_name(text: str) -> DType:
    """`--dtype` / `LLM(dtype=...)`, vLLM's other names included (`half`, `float`)."""
    name = {"half": "float16", "float": "float32"}.get(text, text)
    if name not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"{text!r}: expected auto, float32 (float), bfloat16 or float16 (half)")
    return name  # type: ignore[return-value]


def kv_cache_dtype_name(text: str) -> KVCacheDType:
    """`--kv-cache-dtype` / `LLM(kv_cache_dtype=...)`: vLLM's `fp8` (and Gaudi's `fp8_inc`) is
    E4M3, as in vLLM."""
    name = {"fp8": "fp8_e4m3", "fp8_inc": "fp8_e4m3"}.get(text, text)
    if name not in ("auto", "bfloat16", "fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"{text!r}: expected auto, bfloat16, fp8 (fp8_e4m3, fp8_inc) or fp8_e5m2")
    return name  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which weights to load and how. `model=None` means the bundled SmolLM2-135M-Instruct.
    `engines_per_machine`: the engines loading on this machine; each counts on its share of the
    memory available where the loader decides what to keep."""

    model: str | None = None
    dtype: DType = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int = 0
    engines_per_machine: int = 1


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache shape; block count from `num_kv_blocks`, else `kv_cache_memory` bytes.
    `kv_cache_dtype`: `auto` (the backend's choice for the weights' dtype), `bfloat16`, or fp8
    (`fp8_e4m3`, `fp8_e5m2`: one byte an element, with scales of 1, as vLLM's when a checkpoint
    brings none). `calculate_kv_scales`: an fp8 cache's scales from the first pass (per layer,
    vLLM's rule: the largest |K| / 200, |V| / 100) instead."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 2 << 30
    enable_prefix_caching: bool = True
    kv_cache_dtype: KVCacheDType = "auto"
    calculate_kv_scales: bool = False


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


TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # --tool-call-parser (read in api/tools.py)


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets: the model's recommendation, from
    its generation_config.json (vLLM's `--generation-config auto`) merged with
    `--override-generation-config`; None: the API's own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # max_new_tokens: for a request naming none (context permitting)


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
    max_request_body_bytes: int = 64 << 20
    shutdown_timeout: float = 30.0
    engine_stall_timeout: float = 60.0
    metrics_namespace: str = "vllm"
    log_stats_interval: float = 10.0
    disable_log_stats: bool = False
    max_num_queued_reqs: int | None = None  # choices in flight, whole server (503 over it)
    max_num_queued_tokens: int | None = None  # prompt tokens not yet prefilled (503 over it)
    enable_prefix_caching: bool = True
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    disable_fastapi_docs: bool = False  # no /openapi.json, /docs, /redoc
    enable_force_include_usage: bool = False  # every stream ends with a usage chunk
    # CORS, as vLLM's flags set it (its defaults: any origin, method and header)
    allowed_origins: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    chat_template: str | None = None  # the template's text (--chat-template), else the model's
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # hermes or llama3_json (api/tools.py)
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """The serving topology, with vLLM's flag names: `api_server_count` API servers on the head,
    `data_parallel_size` engines in all, `data_parallel_size_local` of them (ranks
    `data_parallel_start_rank` onwards) on this machine. A `headless` invocation runs engines
    only and joins the head at `data_parallel_address:data_parallel_rpc_port`."""

    api_server_count: int = 1
    data_parallel_size: int = 1
    data_parallel_size_local: int | None = None  # None: every rank from the start rank on
    data_parallel_start_rank: int = 0
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 29550
    headless: bool = False

    def __post_init__(self) -> None:
        m = self.data_parallel_size
        if self.api_server_count < 1:
            raise ValueError("--api-server-count must be at least 1")
        if m < 1:
            raise ValueError("--data-parallel-size must be at least 1")
        if not 0 <= self.data_parallel_start_rank < m:
            raise ValueError(f"--data-parallel-start-rank must be in 0..{m - 1}")
        if not 0 <= self.local_size <= m - self.data_parallel_start_rank:
            raise ValueError(
                f"--data-parallel-size-local {self.local_size} does not fit ranks "
                f"{self.data_parallel_start_rank}..{m - 1}"
            )
        if self.headless and (self.data_parallel_start_rank == 0 or self.local_size == 0):
            raise ValueError(
                "--headless runs ranks of another node's head: give --data-parallel-start-rank "
                "(at least 1) and --data-parallel-size-local (at least 1)"
            )
        if not self.headless and self.data_parallel_start_rank != 0:
            raise ValueError("--data-parallel-start-rank is for --headless nodes (the head is 0)")

    @property
    def local_size(self) -> int:
        if self.data_parallel_size_local is None:
            return self.data_parallel_size - self.data_parallel_start_rank
        return self.data_parallel_size_local

    @property
    def local_ranks(self) -> tuple[int, ...]:
        start = self.data_parallel_start_rank
        return tuple(range(start, start + self.local_size))

    @property
    def multi_node(self) -> bool:
        """Some ranks run on other machines: endpoints are TCP, and nodes register."""
        return self.headless or self.local_size < self.data_parallel_size

    @property
    def needs_coordinator(self) -> bool:
        return self.data_parallel_size > 1 or self.multi_node
