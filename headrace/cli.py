"""The `headrace` command line: `serve`, `generate`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from headrace import envs, vllm_flags
from headrace.config import (
    TOOL_CALL_PARSERS,
    CacheConfig,
    DType,
    EngineConfig,
    KVCacheDType,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    dtype_name,
    kv_cache_dtype_name,
)
from headrace.wire.messages import SamplingParams

logger = logging.getLogger("headrace.cli")

BUNDLED_SERVED_NAME = "SmolLM2-135M-Instruct"


def parse_bytes(text: str) -> int:
    """'2147483648', '2GiB', '512MiB', '2G' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (examples: 2GiB, 512MiB, 1073741824)"
        )
    scale = 1024 ** "KMGT".find(m.group(2).upper()) * 1024 if m.group(2) else 1
    return int(float(m.group(1)) * scale)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _dtype(text: str) -> DType:
    try:
        return dtype_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_strings(text: str) -> list[str]:
    """vLLM's form for the CORS lists: a JSON list of strings."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(
            f'expected a JSON list of strings, e.g. ["*"], not {text!r}'
        )
    return value


def _kv_cache_dtype(text: str) -> KVCacheDType:
    try:
        return kv_cache_dtype_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument("--model", dest="model_flag", default=None, help="MODEL, as a flag (vLLM's)")
    p.add_argument(
        "--dtype",
        type=_dtype,
        default="auto",
        metavar="{auto,float32,bfloat16,float16}",
        help="weights' dtype (vLLM's half = float16, float = float32); float16 runs off CPU "
        "only, and on CPU means auto, with a warning",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per engine step")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens per engine step (prefill chunk)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV-cache blocks (overrides memory)"
    )
    p.add_argument(
        "--kv-cache-memory",
        "--kv-cache-memory-bytes",
        type=parse_bytes,
        default=2 << 30,
        help="KV-cache size per engine (2GiB)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        type=_kv_cache_dtype,
        default="auto",
        metavar="{auto,bfloat16,fp8,fp8_e4m3,fp8_e5m2}",
        help="KV-cache element type: auto (the weights' dtype), bfloat16 (half of float32's "
        "bytes a token) or fp8 (a quarter; fp8 is fp8_e4m3)",
    )
    p.add_argument(
        "--calculate-kv-scales",
        action="store_true",
        help="an fp8 cache's per-layer scales from the first batch (else 1)",
    )
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(args.model, args.dtype, args.device, args.max_model_len, args.seed),
        cache=CacheConfig(
            args.block_size,
            args.num_kv_blocks,
            args.kv_cache_memory,
            args.enable_prefix_caching,
            args.kv_cache_dtype,
            args.calculate_kv_scales,
        ),
        scheduler=SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens),
    )


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_engine_args(p)
    p.add_argument("--host", default=None, help="interface to listen on (default: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", nargs="+", default=None, help="name(s) clients use (default: MODEL)"
    )
    p.add_argument(
        "--api-key",
        default=envs.api_key(),
        help="require `Authorization: Bearer KEY` on /v1/* (env HEADRACE_API_KEY or VLLM_API_KEY)",
    )
    p.add_argument("--api-server-count", type=int, default=1, help="API-server processes")
    p.add_argument(
        "--data-parallel-size", "-dp", type=int, default=1, help="engine cores in all (all nodes)"
    )
    p.add_argument(
        "--data-parallel-size-local",
        "-dpl",
        type=int,
        default=None,
        help="engine cores on this node (default: every rank from the start rank on)",
    )
    p.add_argument(
        "--data-parallel-start-rank",
        "-dpr",
        type=int,
        default=0,
        help="first rank of this node's engines (a --headless node; the head is 0)",
    )
    p.add_argument(
        "--data-parallel-address",
        "-dpa",
        default="127.0.0.1",
        help="the head's address, where headless nodes' engines connect",
    )
    p.add_argument(
        "--data-parallel-rpc-port",
        "-dpp",
        type=int,
        default=29550,
        help="the head's port where headless nodes register",
    )
    p.add_argument(
        "--headless",
        action="store_true",
        help="run this node's engines only, joined to the head at the data-parallel address",
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds to finish in-flight work"
    )
    p.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=60.0,
        help="seconds an engine may hold requests without completing a step before it is killed "
        "and restarted",
    )
    p.add_argument(
        "--max-engine-restarts",
        type=int,
        default=3,
        help="restarts of one engine (or API server) allowed within 10 minutes before the "
        "server reports failed",
    )
    p.add_argument("--disable-log-requests", action="store_true", help="no per-request log line")
    p.add_argument(
        "--metrics-namespace", default="vllm", help="prefix of every serving metric (vllm:...)"
    )
    p.add_argument(
        "--log-stats-interval", type=float, default=10.0, help="seconds between stats log lines"
    )
    p.add_argument("--disable-log-stats", action="store_true", help="no periodic stats line")
    p.add_argument(
        "--max-num-queued-reqs",
        "--max-num-queued-requests",
        type=_positive_int,
        default=None,
        help="answer 503 + Retry-After once this many requests (n choices count n) wait or run, "
        "across every API server and engine (default: no limit)",
    )
    p.add_argument(
        "--max-num-queued-tokens",
        type=_positive_int,
        default=None,
        help="answer 503 + Retry-After once this many prompt tokens wait for prefill, across "
        "every API server and engine (default: no limit)",
    )
    p.add_argument(
        "--disable-access-log-for-endpoints",
        default="",
        help="comma-separated paths left out of the access log (e.g. /health,/metrics)",
    )
    p.add_argument("--uvicorn-log-level", default="info")
    p.add_argument("--disable-uvicorn-access-log", action="store_true", help="no access log at all")
    p.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="no /openapi.json, /docs or /redoc",
    )
    for what in ("origins", "methods", "headers"):
        p.add_argument(
            f"--allowed-{what}",
            type=_json_strings,
            default=["*"],
            help=f'CORS: allowed {what}, a JSON list (default ["*"])',
        )
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument(
        "--generation-config",
        default="auto",
        help="request defaults (temperature, top_p, top_k, min_p, repetition_penalty, "
        "max_new_tokens): auto = the model's generation_config.json, vllm = none, or a "
        "directory holding one",
    )
    p.add_argument(
        "--override-generation-config",
        default=None,
        help='a JSON object merged over the generation config, e.g. {"temperature": 0.5}',
    )
    p.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="a usage chunk at the end of every stream, asked for or not",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template (a file, or the template itself) used instead of the model's",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"); needs '
        "--tool-call-parser",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how tool calls are read out of the model's text with --enable-auto-tool-choice",
    )


def _chat_template(value: str | None) -> str | None:
    """vLLM's rule: a path to a file, or else the template's text itself."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if not any(c in value for c in "{}"):
        raise SystemExit(f"headrace serve: --chat-template {value!r} is neither a file nor Jinja")
    return value


def _serve(args: argparse.Namespace) -> int:
    from headrace.headless import run_headless
    from headrace.launch import LaunchConfig, Launcher

    names = tuple(args.served_model_name or [args.model or BUNDLED_SERVED_NAME])
    server = ServerConfig(
        model=args.model,
        served_model_names=names,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        disable_log_requests=args.disable_log_requests,
        disable_access_log_for_endpoints=tuple(
            p.strip() for p in args.disable_access_log_for_endpoints.split(",") if p.strip()
        ),
        uvicorn_log_level=args.uvicorn_log_level,
        disable_uvicorn_access_log=args.disable_uvicorn_access_log,
        disable_fastapi_docs=args.disable_fastapi_docs,
        enable_force_include_usage=args.enable_force_include_usage,
        allowed_origins=tuple(args.allowed_origins),
        allow_credentials=args.allow_credentials,
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        shutdown_timeout=args.shutdown_timeout,
        engine_stall_timeout=args.engine_stall_timeout,
        metrics_namespace=args.metrics_namespace,
        log_stats_interval=args.log_stats_interval,
        disable_log_stats=args.disable_log_stats,
        max_num_queued_reqs=args.max_num_queued_reqs,
        max_num_queued_tokens=args.max_num_queued_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        chat_template=_chat_template(args.chat_template),
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        sampling_defaults=vllm_flags.sampling_defaults(
            args.model, args.generation_config, args.override_generation_config
        ),
    )
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("headrace serve: --enable-auto-tool-choice needs --tool-call-parser")
    try:
        parallel = ParallelConfig(
            api_server_count=args.api_server_count,
            data_parallel_size=args.data_parallel_size,
            data_parallel_size_local=args.data_parallel_size_local,
            data_parallel_start_rank=args.data_parallel_start_rank,
            data_parallel_address=args.data_parallel_address,
            data_parallel_rpc_port=args.data_parallel_rpc_port,
            headless=args.headless,
        )
        if args.max_engine_restarts < 0:
            raise ValueError("--max-engine-restarts must be at least 0")
        envs.gguf_float_copies()  # read by each engine: a bad value stops here, not in restarts
        cfg = LaunchConfig(
            server,
            engine_config(args),
            parallel,
            args.shutdown_timeout,
            envs.test_load_delay(),
            args.max_engine_restarts,
        )
    except ValueError as exc:
        raise SystemExit(f"headrace serve: {exc}") from None
    if parallel.headless:
        return run_headless(cfg)
    return Launcher(cfg).run()


def _generate(args: argparse.Namespace) -> int:
    from headrace.offline import LLM

    llm = LLM.from_config(engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        seq = out.outputs[0]
        print(json.dumps({"text": seq.text, "finish_reason": seq.finish_reason}))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from headrace.probe import main as probe_main

    return probe_main(args.host, args.port, args.timeout)


def _add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    from headrace.bench.serve import add_bench_serve_args

    add_bench_serve_args(p)


def _bench_serve(args: argparse.Namespace) -> int:
    from headrace.bench.serve import main as bench_main

    return bench_main(args)


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    _add_serve_args(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API",
        description="Serve MODEL (default: the bundled SmolLM2-135M-Instruct) over an "
        "OpenAI-compatible HTTP API, with engine cores in their own processes.",
    )
    _add_serve_args(serve)
    serve.set_defaults(func=_serve, enable_prefix_caching=True)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench_serve = bench.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (like `vllm bench serve`)",
        description="Send a random-token workload to any OpenAI-compatible server and report "
        "TTFT, TPOT, ITL and end-to-end latency exactly as `vllm bench serve` defines them.",
    )
    _add_bench_serve_args(bench_serve)
    bench_serve.set_defaults(func=_bench_serve)
    probe = sub.add_parser(
        "probe",
        help="exit 0 only if a server is ready (/health 200 and a non-empty /v1/models)",
    )
    probe.add_argument("--host", default="127.0.0.1")
    probe.add_argument("--port", type=int, default=8000)
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP call")
    probe.set_defaults(func=_probe)
    gen = sub.add_parser("generate", help="run prompts through the engine in this process")
    _add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=_generate, enable_prefix_caching=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from headrace.process import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "probe":  # a probe prints one line at most
        setup_logging()
    if argv and argv[0] == "serve":
        known = set(_serve_parser()._option_string_actions)
        argv = ["serve", *vllm_flags.strip_ignored(vllm_flags.expand_config_file(argv[1:], known))]
    args = build_parser().parse_args(argv)
    flag = getattr(args, "model_flag", None)
    if flag is not None:  # vLLM's --model, for MODEL
        if args.model is not None and args.model != flag:
            raise SystemExit(f"headrace serve: MODEL {args.model!r} and --model {flag!r} differ")
        args.model = flag
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
