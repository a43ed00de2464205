"""Prometheus metrics, recorded only in API-server processes from what engines report.

Every metric name lives in this module. Names, labels and meanings follow vLLM's V1 set
(shared/reference/metrics.md) under `namespace` (default `vllm`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from headrace.frontend.output import SeqState
from headrace.wire.messages import EngineCoreOutputs, FinishReason

CONTENT_TYPE = CONTENT_TYPE_LATEST
LIFECYCLE_STATES = ("loading", "ready", "draining", "failed")


class ServerMetrics:
    """The scheduler gauges, one series per (model_name, engine), present at 0 from start-up."""

    def __init__(self, model_name: str, num_engines: int, namespace: str = "vllm") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name", "engine"]
        ns = namespace
        self.running = Gauge(
            f"{ns}:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        )
        self.waiting = Gauge(
            f"{ns}:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            registry=self.registry,
        )
        self.kv_usage = Gauge(
            f"{ns}:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            labels,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{ns}:prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            f"{ns}:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=self.registry,
        )
        self.request_success = Counter(
            f"{ns}:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self._finished = [
            {
                r.value: self.request_success.labels(model_name, str(e), r.value)
                for r in FinishReason
            }
            for e in range(num_engines)
        ]
        self._tokens = [
            (
                self.prompt_tokens.labels(model_name, str(e)),
                self.generation_tokens.labels(model_name, str(e)),
            )
            for e in range(num_engines)
        ]
        self.server_state = Gauge(
            f"{ns}:server_state",
            "1 for the server's current lifecycle state (loading, ready, draining, failed).",
            ["state"],
            registry=self.registry,
        )
        self.load_progress = Gauge(
            f"{ns}:model_load_progress",
            "Fraction of the model weights loaded (1 once loaded).",
            registry=self.registry,
        )
        self._states = {s: self.server_state.labels(s) for s in LIFECYCLE_STATES}
        self._series = [
            tuple(g.labels(model_name, str(e)) for g in (self.running, self.waiting, self.kv_usage))
            for e in range(num_engines)
        ]

    def record(self, msg: EngineCoreOutputs) -> None:
        """Called once per engine step message, on the event loop (a few dict lookups)."""
        running, waiting, kv = self._series[msg.engine_index]
        running.set(msg.stats.num_running)
        waiting.set(msg.stats.num_waiting)
        kv.set(msg.stats.kv_cache_usage)

    def on_finish(self, seq: SeqState, reason: str) -> None:
        """One choice ended (aborts by a departed client included): count it and its tokens."""
        prompt, generation = self._tokens[seq.engine_index]
        prompt.inc(seq.prompt_len)
        generation.inc(seq.num_output_tokens)
        self._finished[seq.engine_index][reason].inc()

    def set_lifecycle(self, state: str, load_fraction: float) -> None:
        """Refreshed at scrape time (two gauge writes): the state is the API server's own."""
        for name, gauge in self._states.items():
            gauge.set(1.0 if name == state else 0.0)
        self.load_progress.set(load_fraction)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
