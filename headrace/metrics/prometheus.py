"""Prometheus metrics, recorded only in API-server processes from what engines report.

Every metric name lives in this module. Names, types, labels and buckets follow vLLM's V1 set
(shared/reference/metrics.md) under `namespace` (default `vllm`). With several API servers the
launcher sets PROMETHEUS_MULTIPROC_DIR before they start: counters and histograms are summed over
processes; engine gauges keep the most recent write (every server receives the same values), so
there is exactly one series per (model_name, engine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from headrace.frontend.output import SeqState
from headrace.metrics.multiproc import MultiProcessText, escape_label_value
from headrace.wire.messages import EngineCoreOutputs, EngineReady, FinishReason, RequestTimes

CONTENT_TYPE = CONTENT_TYPE_LATEST
CACHE_S = 1.0  # counters and histograms: at most this stale (Prometheus scrapes every 15 s)
MAX_AGE_S = 2.0  # ... and at most this, for what other API-server processes wrote
# admission_rejections_total's reasons: the limit that refused (vLLM's flag names)
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
LIFECYCLE_STATES = ("loading", "ready", "degraded", "restarting", "draining", "failed")
GaugeMode = Literal["mostrecent", "livemostrecent"]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(m * scale)
        scale *= 10


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    model_name: str
    num_engines: int
    namespace: str = "vllm"
    api_server_index: int = 0


class ServerMetrics:
    """All serving metrics of one API-server process; one child per (model, engine) created
    up front so every series exists at 0 from start-up."""

    def __init__(self, cfg: MetricsConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        ns, me = cfg.namespace, ["model_name", "engine"]
        r = self.registry

        def gauge(name: str, doc: str, labels: list[str], mode: GaugeMode = "mostrecent") -> Gauge:
            return Gauge(f"{ns}:{name}", doc, labels, registry=r, multiprocess_mode=mode)

        def counter(name: str, doc: str, labels: list[str] = me) -> Counter:
            return Counter(f"{ns}:{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"{ns}:{name}", doc, me, registry=r, buckets=buckets)

        self._histogram = histogram
        self._has_token_histograms = False

        self.cache_info = gauge(
            "cache_config_info", "Information of the LLMEngine CacheConfig",
            ["engine", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"],
        )  # fmt: skip
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        )
        self.request_success = counter(
            "request_success", "Count of successfully processed requests.", [*me, "finished_reason"]
        )
        self.preemptions = counter(
            "num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        # headrace's own recovery counters: `headrace_` after the namespace, so no future vLLM
        # name can clash (restarts are counted by the launcher: `restart_counters`).
        self.requests_resent = counter(
            "headrace_requests_resent",
            "Requests re-sent to another engine after theirs was lost, before any output.",
        )
        self.requests_lost = counter(
            "headrace_requests_lost",
            "Requests ended with an error because their engine was lost.",
        )
        self.admission_rejections = counter(
            "admission_rejections", "Requests refused by a queue limit.", ["model_name", "reason"]
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            LATENCY_BUCKETS,
        )
        self.inference_time = histogram(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            LATENCY_BUCKETS,
        )
        self.params_n = histogram(
            "request_params_n", "Histogram of the n request parameter.", N_BUCKETS
        )
        self.request_preemptions = histogram(
            "request_num_preemptions",
            "Number of preemptions per finished request.",
            PREEMPTION_BUCKETS,
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_BUCKETS,
        )
        self.loop_lag = Histogram(
            f"{ns}:event_loop_lag_seconds",
            "How late this API server's event loop ran a timer.",
            ["api_server"],
            registry=r,
            buckets=LOOP_LAG_BUCKETS,
        )
        self._loop_lag = self.loop_lag.labels(str(cfg.api_server_index))
        self.engines = [_EngineSeries(self, cfg.model_name, str(e)) for e in range(cfg.num_engines)]
        self._rejections = {
            reason: self.admission_rejections.labels(cfg.model_name, reason)
            for reason in ADMISSION_REASONS
        }
        # Hot gauges: kept as plain numbers and rendered at every scrape (see LiveGauges).
        self.live = LiveGauges(cfg)
        mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._multiprocess = MultiProcessText(mp_dir) if mp_dir else None
        self._cache = b""
        self._cache_time = -1.0
        self._cache_version = -1
        self.version = 0  # bumped by every write this process makes

    # -- engine steps --------------------------------------------------------------------------
    def record_step(self, msg: EngineCoreOutputs) -> None:
        """Once per engine step message, on the event loop: three gauge writes, and counters
        on the one API server the engine sends them to."""
        s = msg.stats
        self.live.engine_load[msg.engine_index] = (s.num_running, s.num_waiting, s.kv_cache_usage)
        if not s.has_counters:
            return
        e = self.engines[msg.engine_index]
        self.version += 1
        if s.prefix_cache_queries:
            e.prefix_queries.inc(s.prefix_cache_queries)
            e.prefix_hits.inc(s.prefix_cache_hits)
        if s.num_preemptions:
            e.preemptions.inc(s.num_preemptions)
        if s.num_scheduled_tokens:
            e.iteration_tokens.observe(s.num_scheduled_tokens)

    def _token_histograms(self, max_model_len: int) -> None:
        """Histograms whose buckets run up to max_model_len: created once the engines said it."""
        histogram = self._histogram
        tok = token_buckets(max_model_len)
        self.prompt_len = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", tok
        )
        self.generation_len = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", tok
        )
        self.max_generation = histogram(
            "request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tok,
        )
        self.params_max_tokens = histogram(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", tok
        )
        self.kv_computed = histogram(
            "request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).", tok,
        )  # fmt: skip
        for e in self.engines:
            e.bind_token_histograms(self)

    def engine_ready(self, msg: EngineReady, enable_prefix_caching: bool) -> None:
        self.version += 1
        if not self._has_token_histograms:  # the first engine to be ready sets the buckets
            self._has_token_histograms = True
            self._token_histograms(msg.max_model_len)
        self.cache_info.labels(
            str(msg.engine_index), str(msg.block_size), str(msg.num_kv_blocks),
            str(enable_prefix_caching), msg.kv_cache_dtype,
        ).set(1)  # fmt: skip

    def admission_rejected(self, reason: str) -> None:
        self.version += 1
        self._rejections[reason].inc()

    # -- requests (RequestObserver) ------------------------------------------------------------
    def request_params(self, engine_index: int, n: int) -> None:
        self.version += 1
        self.engines[engine_index].params_n.observe(n)

    def first_token(self, seq: SeqState, ttft: float) -> None:
        """Prompt tokens count once the prompt is processed, as in vLLM (a request aborted
        before its first token adds none)."""
        self.version += 1
        e = self.engines[seq.engine_index]
        e.ttft.observe(ttft)
        e.prompt_tokens.inc(seq.prompt_len)

    def generated(self, engine_index: int, num_tokens: int) -> None:
        """Generation tokens count per engine step as they arrive (vLLM's iteration stats),
        so rate() is smooth even when a whole batch finishes at once."""
        self.version += 1
        self.engines[engine_index].generation_tokens.inc(num_tokens)

    def next_token(self, seq: SeqState, gap: float) -> None:
        self.version += 1
        self.engines[seq.engine_index].itl.observe(gap)

    def finished(self, seq: SeqState, reason: str, now: float) -> None:
        """One choice ended (aborts by a departed client included)."""
        self.version += 1
        e = self.engines[seq.engine_index]
        e.finished[reason].inc()
        e.e2e.observe(now - seq.stream.arrival_time)
        e.prompt_len.observe(seq.prompt_len)
        e.generation_len.observe(seq.num_output_tokens)
        e.max_generation.observe(seq.max_tokens)
        if seq.params_max_tokens is not None:
            e.params_max_tokens.observe(seq.params_max_tokens)
        if seq.times is not None:
            self.engine_times(seq, seq.times)

    def engine_times(self, seq: SeqState, t: RequestTimes) -> None:
        """The engine's milestones: with the last output, or with the abort that followed a
        stop string or a departed client."""
        self.version += 1
        e = self.engines[seq.engine_index]
        e.queue_time.observe(max(0.0, t.scheduled - t.queued))
        e.prefill_time.observe(max(0.0, t.first_token - t.scheduled))
        e.decode_time.observe(max(0.0, t.last_token - t.first_token))
        e.inference_time.observe(max(0.0, t.last_token - t.scheduled))
        if seq.num_output_tokens > 1:
            e.tpot.observe((t.last_token - t.first_token) / (seq.num_output_tokens - 1))
        e.request_preemptions.observe(t.num_preemptions)
        e.kv_computed.observe(max(0, seq.prompt_len - seq.num_cached_tokens))

    def recovery(self, engine_index: int, resent: bool) -> None:
        """A choice whose engine was lost was re-sent (to `engine_index`) or lost (on it)."""
        self.version += 1
        e = self.engines[engine_index]
        (e.resent if resent else e.lost).inc()

    # -- this process --------------------------------------------------------------------------
    def observe_loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def set_lifecycle(self, state: str, load_fraction: float) -> None:
        """This API server's own state, read at scrape time."""
        self.live.state, self.live.load_fraction = state, load_fraction

    def exposition(self, fresh: bool = False) -> bytes:
        """Live gauges, rendered now, plus everything else from a snapshot at most
        CACHE_S old that is also refreshed whenever this process wrote since it was taken
        (`fresh` forces a new one): counters and histograms change per request, and
        collecting them from the multiprocess files costs milliseconds, too much to repeat
        at the endpoint picker's 20 Hz."""
        now = time.monotonic()
        stale = now - self._cache_time >= CACHE_S
        if fresh or (
            stale and (self.version != self._cache_version or now - self._cache_time >= MAX_AGE_S)
        ):
            self._cache_version = self.version
            self._cache_time = now
            self._cache = self._collect()
        return self.live.render() + self._cache

    def _collect(self) -> bytes:
        if self._multiprocess is not None:
            return self._multiprocess.render()
        return generate_latest(self.registry)


class LiveGauges:
    """The gauges routers poll (running, waiting, KV usage per engine) and the lifecycle state:
    plain numbers set per engine step, rendered by hand at every scrape (microseconds). Every
    API server holds the same engine figures, so each renders the one series per (model,
    engine) itself; nothing goes through the multiprocess files."""

    def __init__(self, cfg: MetricsConfig) -> None:
        ns, model = cfg.namespace, escape_label_value(cfg.model_name)
        self.engine_load = [(0, 0, 0.0) for _ in range(cfg.num_engines)]
        self.state = "loading"
        self.load_fraction = 0.0
        self._labels = [f'{{engine="{e}",model_name="{model}"}}' for e in range(cfg.num_engines)]
        self._heads = [
            f"# HELP {ns}:{name} {doc}\n# TYPE {ns}:{name} gauge\n"
            for name, doc in (
                ("num_requests_running", "Number of requests in model execution batches."),
                ("num_requests_waiting", "Number of requests waiting to be processed."),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
                ("server_state", "1 for the server's current lifecycle state."),
                ("model_load_progress", "Fraction of the model weights loaded (1 once loaded)."),
            )
        ]
        self._names = [f"{ns}:{n}" for n in (
            "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
            "server_state", "model_load_progress",
        )]  # fmt: skip

    def render(self) -> bytes:
        out: list[str] = []
        for k in range(3):
            out.append(self._heads[k])
            for labels, load in zip(self._labels, self.engine_load, strict=True):
                out.append(f"{self._names[k]}{labels} {float(load[k])!r}\n")
        out.append(self._heads[3])
        for state in LIFECYCLE_STATES:
            value = 1.0 if state == self.state else 0.0
            out.append(f'{self._names[3]}{{state="{state}"}} {value!r}\n')
        out.append(self._heads[4])
        out.append(f"{self._names[4]} {float(self.load_fraction)!r}\n")
        return "".join(out).encode()


class _EngineSeries:
    """The labelled children of one (model, engine), looked up once."""

    def __init__(self, m: ServerMetrics, model: str, engine: str) -> None:
        labels = (model, engine)
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.generation_tokens = m.generation_tokens.labels(*labels)
        self.finished = {r.value: m.request_success.labels(*labels, r.value) for r in FinishReason}
        self.preemptions = m.preemptions.labels(*labels)
        self.prefix_queries = m.prefix_queries.labels(*labels)
        self.prefix_hits = m.prefix_hits.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.itl = m.itl.labels(*labels)
        self.tpot = m.tpot.labels(*labels)
        self.e2e = m.e2e.labels(*labels)
        self.queue_time = m.queue_time.labels(*labels)
        self.inference_time = m.inference_time.labels(*labels)
        self.prefill_time = m.prefill_time.labels(*labels)
        self.decode_time = m.decode_time.labels(*labels)
        self.params_n = m.params_n.labels(*labels)
        self.request_preemptions = m.request_preemptions.labels(*labels)
        self.iteration_tokens = m.iteration_tokens.labels(*labels)
        self.resent = m.requests_resent.labels(*labels)
        self.lost = m.requests_lost.labels(*labels)
        self.labels = labels

    def bind_token_histograms(self, m: ServerMetrics) -> None:
        self.prompt_len = m.prompt_len.labels(*self.labels)
        self.generation_len = m.generation_len.labels(*self.labels)
        self.max_generation = m.max_generation.labels(*self.labels)
        self.params_max_tokens = m.params_max_tokens.labels(*self.labels)
        self.kv_computed = m.kv_computed.labels(*self.labels)


@dataclass(slots=True)
class RestartCounters:
    """Restarts by the launcher (or a headless node's), by what ended the process: `exit N`,
    a signal's name, or `stall`. Written from the launcher into the multiprocess directory,
    so every API server's /metrics shows them."""

    engine: Counter
    api_server: Counter


def restart_counters(namespace: str) -> RestartCounters:
    r = CollectorRegistry()
    return RestartCounters(
        Counter(
            f"{namespace}:headrace_engine_restarts",
            "Engine-core processes restarted in place, by rank and reason.",
            ["engine", "reason"],
            registry=r,
        ),
        Counter(
            f"{namespace}:headrace_api_server_restarts",
            "API-server processes restarted in place, by index and reason.",
            ["api_server", "reason"],
            registry=r,
        ),
    )
