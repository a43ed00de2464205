"""Aggregate, print, save and plot a `headrace bench serve` run, in `vllm bench serve`'s shapes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from headrace.bench.serve import RequestResult

_METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass(slots=True)
class Result:
    """Everything `--save-result` writes; per-request lists are in seconds, aggregates in ms."""

    model: str
    endpoint: str
    duration: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    percentiles: list[float]
    aggregates: dict[str, float] = field(default_factory=dict)
    input_lens: list[int] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[list[float]] = field(default_factory=list)
    e2els: list[float] = field(default_factory=list)
    generated_texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    start_times: list[float] = field(default_factory=list)
    token_times: list[list[float]] = field(default_factory=list)

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration if self.duration else 0.0

    @property
    def output_throughput(self) -> float:
        return self.total_output_tokens / self.duration if self.duration else 0.0

    @property
    def total_token_throughput(self) -> float:
        total = self.total_input_tokens + self.total_output_tokens
        return total / self.duration if self.duration else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": "openai-chat" if "chat" in self.endpoint else "openai",
            "model_id": self.model,
            "endpoint": self.endpoint,
            "request_rate": "inf" if self.request_rate == float("inf") else self.request_rate,
            "burstiness": self.burstiness,
            "max_concurrency": self.max_concurrency,
            "duration": self.duration,
            "completed": self.completed,
            "failed": self.failed,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            **self.aggregates,
            "input_lens": self.input_lens,
            "output_lens": self.output_lens,
            "ttfts": self.ttfts,
            "itls": self.itls,
            "e2els": self.e2els,
            "generated_texts": self.generated_texts,
            "errors": self.errors,
        }


def _stats(name: str, values_s: Sequence[float], percentiles: list[float]) -> dict[str, float]:
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def summarize(
    args: argparse.Namespace,
    model: str,
    results: Sequence[RequestResult],
    duration: float,
    start: float,
) -> Result:
    percentiles = [float(p) for p in str(args.metric_percentiles).split(",") if p.strip()]
    res = Result(
        model=model,
        endpoint=args.endpoint,
        duration=duration,
        completed=0,
        failed=0,
        total_input_tokens=0,
        total_output_tokens=0,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        percentiles=percentiles,
    )
    tpots: list[float] = []
    all_itls: list[float] = []
    for r in results:
        res.input_lens.append(r.prompt_len)
        res.errors.append(r.error)
        res.generated_texts.append(r.generated_text)
        res.ttfts.append(r.ttft)
        res.itls.append(r.itl)
        res.e2els.append(r.latency)
        res.start_times.append(r.start_time - start)
        res.token_times.append([t - start for t in r.chunk_times])
        # Without a usage chunk (a server that ignores stream_options), count content chunks.
        out_len = r.output_tokens or len(r.chunk_times)
        res.output_lens.append(out_len if r.success else 0)
        if not r.success:
            res.failed += 1
            continue
        res.completed += 1
        res.total_input_tokens += r.prompt_len
        res.total_output_tokens += out_len
        if out_len > 1:
            tpots.append((r.latency - r.ttft) / (out_len - 1))
        all_itls.extend(r.itl)
    ok = [r for r in results if r.success]
    res.aggregates.update(_stats("ttft", [r.ttft for r in ok], percentiles))
    res.aggregates.update(_stats("tpot", tpots, percentiles))
    res.aggregates.update(_stats("itl", all_itls, percentiles))
    res.aggregates.update(_stats("e2el", [r.latency for r in ok], percentiles))
    return res


def print_result(res: Result, args: argparse.Namespace) -> None:
    metrics = [m.strip() for m in str(args.percentile_metrics).split(",") if m.strip()]
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append("{:<40} {:<10{}}".format(label, value, fmt))

    row("Successful requests:", res.completed)
    row("Failed requests:", res.failed)
    if res.max_concurrency is not None:
        row("Maximum request concurrency:", res.max_concurrency)
    row("Benchmark duration (s):", res.duration, ".2f")
    row("Total input tokens:", res.total_input_tokens)
    row("Total generated tokens:", res.total_output_tokens)
    row("Request throughput (req/s):", res.request_throughput, ".2f")
    row("Output token throughput (tok/s):", res.output_throughput, ".2f")
    row("Total Token throughput (tok/s):", res.total_token_throughput, ".2f")
    for key in metrics:
        if key not in _METRIC_TITLES:
            continue
        title, short = _METRIC_TITLES[key]
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {short} (ms):", res.aggregates[f"mean_{key}_ms"], ".2f")
        row(f"Median {short} (ms):", res.aggregates[f"median_{key}_ms"], ".2f")
        for p in res.percentiles:
            row(f"P{p:g} {short} (ms):", res.aggregates[f"p{p:g}_{key}_ms"], ".2f")
    lines.append("=" * 50)
    print("\n".join(lines))


PLOT_PANELS = ("TTFT (ms)", "ITL (ms)", "E2E latency (s)", "Output tokens/s over time")


def plot_result(res: Result, path: str) -> Any:
    """Four panels: TTFT, ITL and E2E distributions; output tokens per second over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ok = [i for i, e in enumerate(res.errors) if not e]
    ttft_ms = [res.ttfts[i] * 1000 for i in ok]
    itl_ms = [x * 1000 for i in ok for x in res.itls[i]]
    e2e_s = [res.e2els[i] for i in ok]
    for ax, values, title in zip(
        axes.flat[:3], (ttft_ms, itl_ms, e2e_s), PLOT_PANELS, strict=False
    ):
        ax.hist(values or [0.0], bins=50, color="#3b6ea8")
        ax.set_title(title)
        ax.set_ylabel("count")
    # Each content chunk is credited with the tokens it carried on average for its request.
    ax = axes.flat[3]
    times: list[float] = []
    weights: list[float] = []
    for i in ok:
        chunks = res.token_times[i]
        if chunks:
            per_chunk = res.output_lens[i] / len(chunks)
            times.extend(chunks)
            weights.extend([per_chunk] * len(chunks))
    span = max(times, default=0.0)
    bins = max(1, int(np.ceil(span)))
    counts, edges = np.histogram(
        times or [0.0], bins=bins, range=(0, bins), weights=weights or None
    )
    ax.plot(edges[:-1], counts, drawstyle="steps-post", color="#c0504d")
    ax.set_title(PLOT_PANELS[3])
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("tokens/s")
    fig.suptitle(
        f"{res.model} {res.endpoint}: {res.completed} requests, "
        f"{res.output_throughput:.1f} output tok/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
