"""/metrics: vLLM's names, types, labels and buckets, and counts that add up exactly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headrace.metrics.prometheus import (
    ITERATION_BUCKETS,
    ITL_BUCKETS,
    LATENCY_BUCKETS,
    N_BUCKETS,
    PREEMPTION_BUCKETS,
    TTFT_BUCKETS,
    token_buckets,
)
from tests.e2e.server import ServerProcess, poll, wait_idle

pytestmark = pytest.mark.slow

ME = {"model_name", "engine"}
TOK = "tok"
SKY = (
    "Describe the sky over a quiet harbour at dawn, the colours of the clouds, the light on the "
    "water, the boats waiting at anchor and the birds above them. The sky is"
)
# name (without the namespace) -> (type, labels, buckets) as in shared/reference/metrics.md
REFERENCE: dict[str, tuple[str, set[str], Any]] = {
    "num_requests_running": ("gauge", ME, None),
    "num_requests_waiting": ("gauge", ME, None),
    "kv_cache_usage_perc": ("gauge", ME, None),
    "cache_config_info": ("gauge", {"engine", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"}, None),
    "prompt_tokens": ("counter", ME, None),
    "generation_tokens": ("counter", ME, None),
    "request_success": ("counter", ME | {"finished_reason"}, None),
    "num_preemptions": ("counter", ME, None),
    "prefix_cache_queries": ("counter", ME, None),
    "prefix_cache_hits": ("counter", ME, None),
    "admission_rejections": ("counter", {"model_name", "reason"}, None),
    "time_to_first_token_seconds": ("histogram", ME, TTFT_BUCKETS),
    "inter_token_latency_seconds": ("histogram", ME, ITL_BUCKETS),
    "request_time_per_output_token_seconds": ("histogram", ME, ITL_BUCKETS),
    "e2e_request_latency_seconds": ("histogram", ME, LATENCY_BUCKETS),
    "request_queue_time_seconds": ("histogram", ME, LATENCY_BUCKETS),
    "request_inference_time_seconds": ("histogram", ME, LATENCY_BUCKETS),
    "request_prefill_time_seconds": ("histogram", ME, LATENCY_BUCKETS),
    "request_decode_time_seconds": ("histogram", ME, LATENCY_BUCKETS),
    "request_prompt_tokens": ("histogram", ME, TOK),
    "request_generation_tokens": ("histogram", ME, TOK),
    "request_max_num_generation_tokens": ("histogram", ME, TOK),
    "request_params_max_tokens": ("histogram", ME, TOK),
    "request_params_n": ("histogram", ME, N_BUCKETS),
    "request_num_preemptions": ("histogram", ME, PREEMPTION_BUCKETS),
    "request_prefill_kv_computed_tokens": ("histogram", ME, TOK),
    "iteration_tokens_total": ("histogram", ME, ITERATION_BUCKETS),
    "server_state": ("gauge", {"state"}, None),
    "model_load_progress": ("gauge", set(), None),
    "event_loop_lag_seconds": ("histogram", {"api_server"}, "any"),
    "headrace_requests_resent": ("counter", ME, None),
    "headrace_requests_lost": ("counter", ME, None),
}  # fmt: skip
HTTP_FAMILIES = {
    "http_requests": "counter",
    "http_request_size_bytes": "summary",
    "http_response_size_bytes": "summary",
    "http_request_duration_highr_seconds": "histogram",
    "http_request_duration_seconds": "histogram",
}


def families(url: str) -> dict[str, Any]:
    text = httpx.get(url + "/metrics", headers={"Cache-Control": "no-cache"}).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample_name: str, **labels: str) -> float:
    """Sum of the samples named `sample_name` whose labels include `labels`."""
    total = 0.0
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_exposition_matches_the_reference(server: ServerProcess) -> None:
    server.client().completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    fams = families(server.url)
    max_len = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    for name, (kind, labels, buckets) in REFERENCE.items():
        fam = fams.get(f"vllm:{name}")
        assert fam is not None, name
        assert fam.type == kind, (name, fam.type)
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
        if kind == "histogram" and buckets != "any":
            want = token_buckets(max_len) if buckets == TOK else list(buckets)
            bounds = sorted(
                {float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")}
            )
            assert bounds == [float(b) for b in want] + [float("inf")], name
    ours = {n for n in fams if n.startswith("vllm:")}
    assert ours == {f"vllm:{n}" for n in REFERENCE}, ours ^ {f"vllm:{n}" for n in REFERENCE}
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error"}
    for name, kind in HTTP_FAMILIES.items():
        assert fams[name].type == kind, name
    handlers = {s.labels.get("handler") for s in fams["http_requests"].samples}
    assert "/v1/completions" in handlers
    assert not handlers & {"/metrics", "/health", "/health/ready", "/health/live"}
    one = [s for s in fams["vllm:num_requests_running"].samples]
    assert len(one) == 1  # exactly one series per (model, engine)


def test_counts_add_up_after_a_scripted_mix(server: ServerProcess) -> None:
    url = server.url
    wait_idle(url)
    before = families(url)
    client = server.client()
    prompt_tokens = generation_tokens = 0
    reasons = {"length": 0, "stop": 0, "abort": 0}

    for i in range(3):  # stopped by length
        out = client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=f"Count to {i + 3}:", max_tokens=5 + i,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].finish_reason == "length" and out.usage is not None
        prompt_tokens += out.usage.prompt_tokens
        generation_tokens += out.usage.completion_tokens
        reasons["length"] += 1
    probe = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=SKY, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert probe.usage is not None
    prompt_tokens += probe.usage.prompt_tokens
    generation_tokens += probe.usage.completion_tokens
    reasons["length"] += 1
    stop = probe.choices[0].text.strip()[:2]
    for _ in range(2):  # stopped by a stop string
        out = client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=SKY, max_tokens=12, temperature=0,
            stop=[stop],
        )  # fmt: skip
        assert out.choices[0].finish_reason == "stop" and out.usage is not None
        prompt_tokens += out.usage.prompt_tokens
        generation_tokens += out.usage.completion_tokens
        reasons["stop"] += 1

    async def leave_after_first_token(i: int) -> int:
        body = {"prompt": f"Story {i}:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        seen = 0
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as resp,
        ):
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    seen += 1
                    break
        return seen

    async def aborts() -> list[int]:
        return await asyncio.gather(*(leave_after_first_token(i) for i in range(2)))

    seen = sum(asyncio.run(aborts()))
    abort_prompts = sum(
        httpx.post(url + "/tokenize", json={"prompt": f"Story {i}:"}).json()["count"]
        for i in range(2)
    )
    reasons["abort"] += 2
    wait_idle(url)
    after = families(url)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    for reason, count in reasons.items():
        assert delta("vllm:request_success_total", finished_reason=reason) == count, reason
    assert delta("vllm:request_success_total", finished_reason="error") == 0
    assert delta("vllm:prompt_tokens_total") == prompt_tokens + abort_prompts
    aborted_generated = delta("vllm:generation_tokens_total") - generation_tokens
    assert seen <= aborted_generated <= seen + 8  # what the aborted two made before the abort
    finished = sum(reasons.values())
    for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens",
                 "request_max_num_generation_tokens", "request_params_max_tokens"):  # fmt: skip
        assert delta(f"vllm:{hist}_count") == finished, hist
    assert delta("vllm:request_params_n_count") == finished
    for hist in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_num_preemptions",
                 "request_prefill_kv_computed_tokens"):  # fmt: skip
        assert delta(f"vllm:{hist}_count") == finished, hist
    # TPOT needs two tokens: every request but, perhaps, an aborted one that made just one.
    tpot = delta("vllm:request_time_per_output_token_seconds_count")
    assert finished - reasons["abort"] <= tpot <= finished
    assert delta("vllm:request_generation_tokens_sum") == generation_tokens + aborted_generated
    # Tokens computed per step: every prompt token not served from the prefix cache, and every
    # generated token but each request's last (it is sampled, never fed back); plus the few a
    # request ended here (stop string, client gone) computed before the engine got the abort.
    computed = delta("vllm:iteration_tokens_total_sum")
    hits = delta("vllm:prefix_cache_hits_total")
    all_tokens = prompt_tokens + abort_prompts + generation_tokens + aborted_generated
    ended_here = reasons["stop"] + reasons["abort"]
    assert 0 <= computed - (all_tokens - hits - finished) <= 3 * ended_here
    assert delta("vllm:prefix_cache_queries_total") >= prompt_tokens
    assert delta("vllm:prefix_cache_hits_total") >= 3 * 16  # SKY (3 full blocks) asked 3 times
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(after, f"vllm:{gauge}") == 0.0, gauge


def test_plain_scrapes_catch_up_within_the_snapshot_age(server: ServerProcess) -> None:
    def success_total() -> float:
        text = httpx.get(server.url + "/metrics").text  # no Cache-Control: may be a snapshot
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        return value(fams, "vllm:request_success_total")

    start = value(families(server.url), "vllm:request_success_total")
    server.client().completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    poll(lambda: success_total() == start + 1, 3)


def test_two_api_servers_share_one_view() -> None:
    """Two API-server processes behind one port: whichever answers /metrics reports the totals
    of both, and one series per (model, engine)."""
    srv = ServerProcess("--api-server-count", "2", "--max-model-len", "1024").wait_ready()
    try:
        assert len(srv.titled_children("ApiServer_")) == 2

        async def send_all() -> None:
            limits = httpx.Limits(max_keepalive_connections=0)  # new connections spread out
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
                await asyncio.gather(*(
                    c.post("/v1/completions", json={"prompt": f"Hi {i}", "max_tokens": 3,
                                                    "ignore_eos": True})
                    for i in range(12)
                ))  # fmt: skip

        asyncio.run(send_all())
        wait_idle(srv.url)
        for _ in range(6):  # each scrape may land on either process
            with httpx.Client(base_url=srv.url) as c:  # a fresh connection each time
                text = c.get("/metrics", headers={"Cache-Control": "no-cache"}).text
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            assert value(fams, "vllm:request_success_total", finished_reason="length") == 12
            assert value(fams, "vllm:generation_tokens_total") == 36
            assert len(fams["vllm:num_requests_running"].samples) == 1
            lag = fams["vllm:event_loop_lag_seconds"].samples
            assert {x.labels["api_server"] for x in lag} == {"0", "1"}  # both write, either reads
            assert value(fams, "http_requests_total", handler="/v1/completions") == 12
    finally:
        assert srv.stop() == 0
