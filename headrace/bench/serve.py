"""`headrace bench serve`: a load generator for any OpenAI-compatible server, measuring what
`vllm bench serve` measures, the same way, so numbers compare across servers.

Per request (streaming, `stream_options.include_usage`):
- TTFT: from sending to the first chunk that carries content.
- ITL: the gaps between successive content chunks.
- E2E latency: from sending to the last content chunk.
- TPOT: (E2E - TTFT) / (output tokens - 1); output tokens from the final `usage` chunk.
Arrivals: `--request-rate inf` sends everything at once; otherwise gaps are gamma-distributed with
shape `--burstiness` (1 = Poisson) and mean 1/rate. `--max-concurrency` caps requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from headrace import envs
from headrace.bench.dataset import Prompt, RemoteTokenizer, random_prompts
from headrace.bench.report import Result, plot_result, print_result, summarize


class BenchError(RuntimeError):
    """A problem with the target server, reported as one line."""


@dataclass(slots=True)
class RequestResult:
    """One request's measurements, in seconds (as vLLM keeps them)."""

    prompt_len: int
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    generated_text: str = ""
    error: str = ""
    start_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)


def _payload(args: argparse.Namespace, model: str, prompt: Prompt) -> dict[str, Any]:
    common: dict[str, Any] = {
        "model": model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": args.ignore_eos,
    }
    if args.endpoint.endswith("chat/completions"):
        return {
            **common,
            "messages": [{"role": "user", "content": prompt.text}],
            "max_completion_tokens": prompt.output_len,
        }
    return {**common, "prompt": prompt.text, "max_tokens": prompt.output_len}


def _content(data: dict[str, Any]) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        return str((c.get("delta") or {}).get("content") or "")
    return str(c.get("text") or "")


async def send_one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], prompt_len: int
) -> RequestResult:
    out = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    out.start_time = start
    last = start
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                chunk = line[5:].strip()
                if chunk == "[DONE]":
                    break
                data = json.loads(chunk)
                if "error" in data:
                    out.error = str(data["error"])
                    return out
                text = _content(data)
                if text:
                    now = time.perf_counter()
                    if not out.chunk_times:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    out.chunk_times.append(now)
                    out.generated_text += text
                elif data.get("usage"):
                    out.output_tokens = int(data["usage"].get("completion_tokens") or 0)
        out.latency = last - start
        out.success = bool(out.chunk_times)
        if not out.success:
            out.error = "the stream carried no content"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def _arrivals(n: int, rate: float, burstiness: float, seed: int) -> Any:
    """Yield request indexes at gamma-distributed intervals (all at once for rate = inf)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            theta = 1.0 / (rate * burstiness)
            await asyncio.sleep(float(rng.gamma(shape=burstiness, scale=theta)))


async def probe_server(client: httpx.AsyncClient, base_url: str) -> str:
    """The first served model name; a clear BenchError if the server is not usable."""
    try:
        resp = await client.get(base_url + "/v1/models", timeout=10)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {base_url}: {type(exc).__name__}: {exc}") from None
    try:
        data = resp.json()["data"]
        return str(data[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(
            f"{base_url}/v1/models answered {resp.status_code} without a model list: "
            "is this an OpenAI-compatible server, and is it ready?"
        ) from None


async def run_benchmark(args: argparse.Namespace) -> Result:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    base_url = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(6 * 3600.0, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await probe_server(client, base_url)
        if args.model:
            await probe_server(client, base_url)
        tokenizer = RemoteTokenizer(client, base_url, model, args.tokenizer)
        prompts = await random_prompts(
            tokenizer,
            args.num_prompts + args.num_warmups,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.seed,
        )
        url = base_url + args.endpoint
        warm, measured = prompts[: args.num_warmups], prompts[args.num_warmups :]
        if warm:
            print(f"Warming up with {len(warm)} requests...", file=sys.stderr)
            await asyncio.gather(
                *(send_one(client, url, _payload(args, model, p), p.input_len) for p in warm)
            )
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        progress = _progress(len(measured), args.disable_tqdm)

        async def limited(p: Prompt) -> RequestResult:
            if sem is None:
                res = await send_one(client, url, _payload(args, model, p), p.input_len)
            else:
                async with sem:
                    res = await send_one(client, url, _payload(args, model, p), p.input_len)
            progress.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(measured), args.request_rate, args.burstiness, args.seed):
            tasks.append(asyncio.create_task(limited(measured[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        progress.close()
    return summarize(args, model, results, duration, start)


def _progress(total: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=disable, desc="requests")


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--endpoint",
        default="/v1/completions",
        choices=["/v1/completions", "/v1/chat/completions"],
    )
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer path (default: /tokenize)")
    p.add_argument("--dataset-name", default="random", choices=["random"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="req/s, or inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so every request makes exactly its output length (random data)",
    )
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--api-key", default=envs.openai_api_key(), help="default: $OPENAI_API_KEY")


def main(args: argparse.Namespace) -> int:
    if args.burstiness <= 0:
        raise SystemExit("headrace bench serve: --burstiness must be positive")
    random.seed(args.seed)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    try:
        result = asyncio.run(run_benchmark(args))
    except BenchError as exc:
        print(f"headrace bench serve: error: {exc}", file=sys.stderr)
        return 1
    print_result(result, args)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    if args.plot:
        plot_result(result, args.plot)
    return 0 if result.completed else 1
