"""`headrace serve` flags, the API key, and the loading state, against real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import ServerProcess, poll, process_running

pytestmark = pytest.mark.slow


def test_serve_help_lists_the_vllm_shaped_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "headrace", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--host", "--port", "--served-model-name", "--max-model-len", "--max-num-seqs",
        "--max-num-batched-tokens", "--block-size", "--num-kv-blocks", "--dtype", "--device",
        "--seed", "--api-key", "--disable-log-requests", "--kv-cache-dtype",
    ):  # fmt: skip
        assert flag in out, flag


def test_unknown_flag_is_an_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "headrace", "serve", "--no-such-flag"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--no-such-flag" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "headrace", "serve", "--kv-cache-dtype", "int4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "'int4': expected auto, bfloat16, fp8" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "headrace", "serve", "--dtype", "fp64"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "'fp64': expected auto, float32 (float)" in proc.stderr


def test_vllm_flags_headrace_cannot_honour_are_errors(tmp_path) -> None:
    """A value that would change what clients get is refused, not ignored; so are a MODEL and
    a --model that differ, and a --config that is not a YAML mapping."""
    bad_config = tmp_path / "list.yaml"
    bad_config.write_text("- max_num_seqs\n")
    for args, words in [
        (["--guided-decoding-backend", "outlines"], "only xgrammar"),
        (["--allowed-origins", "*"], "expected a JSON list of strings"),
        (["a.gguf", "--model", "b.gguf"], "differ"),
        (["--config", str(bad_config)], "expected a mapping of flags"),
        (["--config", str(tmp_path / "absent.yaml")], "absent.yaml"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "headrace", "serve", *args], capture_output=True, text=True
        )
        assert proc.returncode != 0 and words in proc.stderr, (args, proc.stderr)


def test_a_vllm_manifest_runs_unchanged(tmp_path) -> None:
    """vLLM's `--config` YAML (as a ConfigMap mounts it; the command line wins over it),
    `--model`, the frontend flags headrace honours, and GPU-only flags dropped with a warning."""
    from headrace.model.loader import bundled_model_path

    config = tmp_path / "vllm.yaml"
    config.write_text(
        f"model: {bundled_model_path()}\n"
        "served_model_name: [from-config]\n"
        "max_model_len: 512\n"
        "enable_force_include_usage: true\n"
        "disable_fastapi_docs: true\n"
        "enable_prefix_caching: false\n"
    )
    generation = tmp_path / "generation"  # vLLM's --generation-config DIR
    generation.mkdir()
    (generation / "generation_config.json").write_text('{"temperature": 0.0, "top_p": 0.5}')
    srv = ServerProcess(
        "--generation-config", str(generation),
        "--override-generation-config", '{"max_new_tokens": 5}',
        "--config", str(config), "--max-model-len", "1024", "--uvicorn-log-level", "info",
        "--disable-uvicorn-access-log", "-O3", "--compilation-config", '{"level": 3}',
        "--async-scheduling", "--tokenizer", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--quantization", "gguf", "--kv-cache-memory-bytes", "256MiB",
        "--max-num-partial-prefills", "2", "--enable-prompt-tokens-details",
        "--api-key", "k", "--allowed-origins", '["https://ui.example"]',
    ).wait_ready()  # fmt: skip
    try:
        key = {"Authorization": "Bearer k"}
        models = httpx.get(srv.url + "/v1/models", headers=key).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("from-config", 1024)]
        chunks = list(
            srv.client(api_key="k").chat.completions.create(
                model="from-config", messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4, stream=True,
            )
        )  # fmt: skip
        usage = chunks[-1].usage  # no stream_options asked for it: the server's flag did
        assert usage is not None and usage.completion_tokens == 4 and not chunks[-1].choices
        # a request naming no temperature or max_tokens takes the generation config's: greedy,
        # 5 tokens, the same text twice; one that names them gets them
        client = srv.client(api_key="k")
        ask = {"model": "from-config", "messages": [{"role": "user", "content": "Tell a story"}]}
        texts = set()
        for _ in range(2):
            r = client.chat.completions.create(**ask)
            assert r.usage is not None and r.usage.completion_tokens == 5
            texts.add(r.choices[0].message.content)
        assert len(texts) == 1
        r = client.chat.completions.create(**ask, max_tokens=2, temperature=1.0)
        assert r.usage is not None and r.usage.completion_tokens == 2
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(srv.url + path).status_code == 404, path
        # CORS: a browser's preflight (no key) is answered for the allowed origin only, and an
        # answer, a 401 included, carries the header that lets the page read it
        preflight = {"Access-Control-Request-Method": "POST"}
        for origin, status in (("https://ui.example", 200), ("https://elsewhere.example", 400)):
            r = httpx.options(
                srv.url + "/v1/chat/completions", headers={"Origin": origin, **preflight}
            )
            assert r.status_code == status, (origin, r.status_code)
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://ui.example"})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        families = text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
        info = next(f for f in families if f.name == "vllm:cache_config_info")
        [labels] = [m.labels for m in info.samples]
        assert labels["enable_prefix_caching"] == "False"  # from the config file
    finally:
        assert srv.stop() == 0, srv.log_tail()
    log = srv.log.read_text()
    for flag in ("-O 3", "--compilation-config", "--async-scheduling", "--tokenizer"):
        assert f"ignoring vLLM flag {flag}" in log, flag
    assert "GET /v1/models" not in log  # no access log
    assert "request defaults from the model's generation config: " in log
    assert "(256 MiB), max_model_len 1024" in log  # --kv-cache-memory-bytes; the command line


def test_bad_gguf_float_copies_setting_stops_serve_at_start() -> None:
    """Each engine reads HEADRACE_GGUF_FLOAT_COPIES while loading; a bad value is refused before
    any process starts, rather than failing every engine start."""
    proc = subprocess.run(
        [sys.executable, "-m", "headrace", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADRACE_GGUF_FLOAT_COPIES": "maybe"},
        timeout=60,
    )
    assert proc.returncode != 0
    assert "HEADRACE_GGUF_FLOAT_COPIES must be auto, 1 or 0, not 'maybe'" in proc.stderr


def test_loading_state_api_key_and_ignored_vllm_flags() -> None:
    """While loading (stretched to 8 s): probes and inference answer 503 with Retry-After. Then
    the API key guards /v1/* (401 without it), and vLLM-only flags were accepted with a warning."""
    srv = ServerProcess(
        "--api-key", "sekret", "--served-model-name", "smol", "alias",
        "--gpu-memory-utilization", "0.9", "--enforce-eager", "--tensor-parallel-size=1",
        "--max-model-len", "1024", "--disable-log-requests", "--kv-cache-dtype", "fp8",
        "--calculate-kv-scales", "--dtype", "half",
        env={"HEADRACE_TEST_LOAD_DELAY": "8"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        resp = None
        while time.monotonic() < deadline:  # the port opens long before the model is loaded
            try:
                resp = httpx.get(srv.url + "/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert resp is not None and resp.status_code == 503, resp
        assert resp.json()["status"] == "loading" and resp.headers["retry-after"]
        ready = httpx.get(srv.url + "/health/ready")
        assert ready.status_code == 503 and "fraction" in ready.json()["progress"]
        assert httpx.get(srv.url + "/health/live").status_code == 200
        headers = {"Authorization": "Bearer sekret"}
        assert httpx.get(srv.url + "/v1/models", headers=headers).status_code == 503
        busy = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "hi"}, headers=headers, timeout=10
        )
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert busy.json()["error"]["code"] == 503
        assert httpx.get(srv.url + "/metrics").status_code == 200

        srv.wait_ready()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        bad = srv.client(api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = srv.client(api_key="sekret")
        assert [m.id for m in good.models.list().data] == ["smol", "alias"]
        out = good.completions.create(model="alias", prompt="Hello", max_tokens=3)
        assert out.model == "alias" and out.usage is not None
        assert out.usage.completion_tokens <= 3
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        # a manifest's fp8 cache (vLLM's fp8 is E4M3), and /metrics says what is stored
        families = text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
        info = next(f for f in families if f.name == "vllm:cache_config_info")
        assert [m.labels["cache_dtype"] for m in info.samples] == ["float8_e4m3fn"]
        children = srv.children()
        assert len(children) >= 2  # an engine and an API server
    finally:
        code = srv.stop(signal.SIGINT)  # Ctrl-C stops everything
    poll(lambda: not [p for p in children if process_running(p)], 5)
    log = srv.log.read_text()
    assert "ignoring vLLM flag --gpu-memory-utilization 0.9" in log
    assert "ignoring vLLM flag --enforce-eager" in log
    assert "KV cache torch.float8_e4m3fn: " in log  # the engine's load line
    assert "fp8 KV cache scales from the first batch" in log  # --calculate-kv-scales
    # a GPU manifest's --dtype half: the CPU backends take auto's choice, and say so
    assert "--dtype float16: the CPU backends do not compute in float16; using" in log
    assert code == 0, srv.log_tail()


def test_generate_runs_the_engine_flags_in_process() -> None:
    """`headrace generate` builds its LLM from the same flags as `serve` (LLM.from_config)."""
    from headrace.offline import LLM
    from headrace.wire.messages import SamplingParams

    out = subprocess.run(
        [sys.executable, "-m", "headrace", "generate", "--prompt", "The capital of France is",
         "--max-tokens", "6", "--dtype", "float32", "--num-kv-blocks", "32",
         "--no-enable-prefix-caching"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = json.loads(out.strip().splitlines()[-1])
    llm = LLM(dtype="float32", num_kv_blocks=32, enable_prefix_caching=False)
    want = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=6))
    assert line == {"text": want[0].outputs[0].text, "finish_reason": "length"}
