"""The torch backend on CUDA (`--device cuda`): the backend and its bf16 KV cache, greedy parity
with transformers, bf16, float16 and an fp8 cache close to float32, and a served request with
its metrics, seeded sampling and a JSON schema. Runs where torch sees a CUDA device; skipped
elsewhere."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from headrace.offline import LLM
from headrace.wire.messages import SamplingParams
from tests.e2e.server import ServerProcess, sum_by
from tests.engine.test_greedy_vs_transformers import (
    GREEDY,
    MAX_TOKENS,
    QUESTIONS,
    Reference,
    _check_all,
    _conv,
    assert_bf16_close,
    assert_close_to_f32,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_torch_backend_with_a_bf16_cache() -> None:
    llm = LLM(device="cuda")  # dtype auto
    runner = llm.engine.runner
    assert runner.backend.name == "torch" and runner.backend.kernels is None
    assert runner.dtype == runner.kv_dtype == torch.bfloat16
    assert all(c.is_cuda and c.dtype == torch.bfloat16 for c in runner.kv_caches)
    assert llm.engine.info.kv_cache_dtype == "bfloat16"
    out = llm.chat(_conv(QUESTIONS[0]), GREEDY)
    assert "Paris" in out[0].outputs[0].text


def test_greedy_float32_matches_transformers() -> None:
    reference = Reference()
    llm = LLM(device="cuda", dtype="float32", enable_prefix_caching=False)
    _check_all(llm, reference, llm.chat([_conv(q) for q in QUESTIONS], GREEDY))


def test_bfloat16_stays_close_to_float32() -> None:
    convs = [_conv(q) for q in QUESTIONS[:8]]
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    f32 = LLM(device="cuda", dtype="float32").chat(convs, with_logprobs)
    assert_bf16_close(f32, LLM(device="cuda", dtype="bfloat16").chat(convs, GREEDY))


def test_float16_stays_close_to_float32() -> None:
    """`--dtype half`, as vLLM manifests for GPUs without bf16 give it: float16 weights and
    cache, text within the bounds bf16's is held to."""
    convs = [_conv(q) for q in QUESTIONS[:8]]
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    f32 = LLM(device="cuda", dtype="float32").chat(convs, with_logprobs)
    llm = LLM(device="cuda", dtype="float16")
    assert llm.engine.runner.dtype == llm.engine.runner.kv_dtype == torch.float16
    assert llm.engine.info.kv_cache_dtype == "float16"
    assert_bf16_close(f32, llm.chat(convs, GREEDY))


def test_fp8_kv_cache_stays_close_to_float32() -> None:
    """`--kv-cache-dtype fp8` (E4M3) over float32 weights: one byte an element, attention in the
    weights' dtype, text within the bounds the CPU backends' fp8 cache is held to."""
    convs = [_conv(q) for q in QUESTIONS[:8]]
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    f32 = LLM(device="cuda", dtype="float32").chat(convs, with_logprobs)
    llm = LLM(device="cuda", dtype="float32", kv_cache_dtype="fp8")
    assert all(c.dtype == torch.float8_e4m3fn for c in llm.engine.runner.kv_caches)
    assert_close_to_f32(f32, llm.chat(convs, GREEDY), 1.5, 6, "fp8")


def test_served_on_cuda() -> None:
    srv = ServerProcess("--device", "cuda").wait_ready()
    try:
        client = srv.client()
        chat = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=_conv(QUESTIONS[0]), max_tokens=16,
            temperature=0,
        )  # fmt: skip
        assert "Paris" in (chat.choices[0].message.content or "")
        seeded = [
            client.completions.create(
                model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=16,
                temperature=1.0, seed=7,
            ).choices[0].text
            for _ in range(2)
        ]  # fmt: skip
        assert seeded[0] == seeded[1]
        schema = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}  # fmt: skip
        constrained = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=_conv("Name a city in JSON."), max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        )  # fmt: skip
        assert "city" in json.loads(constrained.choices[0].message.content or "")
        assert httpx.get(srv.url + "/metrics").status_code == 200
        tokens = sum_by(srv.url, "vllm:generation_tokens_total", "model_name")
        assert sum(tokens.values()) >= 16 + 2 * 16
    finally:
        assert srv.stop() == 0
