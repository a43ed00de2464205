"""API servers 1 vs 2 in one invocation: req/s, p99 TTFT and each process's CPU.

    python benchmarks/scale_out.py frontend   # a tiny random-weight model: the frontend is the work
    python benchmarks/scale_out.py bundled    # the bundled model at 64 users

`frontend` writes a 2-layer, 64-wide Llama with random weights and the bundled model's tokenizer
to a temp dir, so an engine step costs little and the API servers (HTTP, JSON, SSE,
detokenizing) carry the load: short prompts and outputs, many concurrent streams. `bundled`
serves the real model at 64 users, where the engine is the work. Each mode starts
`headrace serve --api-server-count 1` and `2` alternately (`--rounds` each), drives each with
`headrace bench serve` (a separate process) and reports the medians, the ratio, and the CPU
seconds each process used per request (from /proc), which says what a 2-core machine runs out
of first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.server import ServerProcess, process_title  # noqa: E402

MODES = {
    # (bench serve args, serve args)
    "frontend": (
        ["--num-prompts", "600", "--random-input-len", "16", "--random-output-len", "8",
         "--max-concurrency", "64", "--ignore-eos"],
        ["--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "2048"],
    ),
    "bundled": (
        ["--num-prompts", "192", "--random-input-len", "158", "--random-output-len", "128",
         "--max-concurrency", "64", "--ignore-eos"],
        ["--max-model-len", "2048"],
    ),
}  # fmt: skip


def tiny_model(directory: Path) -> Path:
    """A random-weight 2-layer Llama with the bundled model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from headrace.model.loader import bundled_model_path, load_tokenizer

    tok = load_tokenizer(bundled_model_path())
    tok.save_pretrained(str(directory))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    return directory


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(model: str | None, api_servers: int, mode: str) -> dict[str, float]:
    bench_args, serve_args = MODES[mode]
    args = [*([model] if model else []), "--api-server-count", str(api_servers), *serve_args]
    srv = ServerProcess(*args, "--disable-log-requests", "--disable-log-stats").wait_ready(300)
    try:
        children = {pid: process_title(pid).removeprefix("headrace::") for pid in srv.children()}
        result = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, "-m", "headrace", "bench", "serve", "--base-url", srv.url,
               "--endpoint", "/v1/completions", *bench_args, "--num-warmups", "8",
               "--save-result", str(result), "--disable-tqdm"]  # fmt: skip
        before = {pid: cpu_seconds(pid) for pid in children}
        started = time.monotonic()
        bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _, _, usage = os.wait4(bench.pid, 0)
        bench.returncode = 0
        wall = time.monotonic() - started
        out = json.loads(result.read_text())
        row = {
            "req_s": out["request_throughput"],
            "out_tok_s": out["output_throughput"],
            "p99_ttft_ms": out["p99_ttft_ms"],
            "failed": out["failed"],
            "wall_s": wall,
            "cpu_bench_client": usage.ru_utime + usage.ru_stime,
        }
        for pid, name in children.items():
            kind = name.rstrip("0123456789").rstrip("_")
            used = cpu_seconds(pid) - before[pid]
            row[f"cpu_{kind}"] = row.get(f"cpu_{kind}", 0.0) + used
        return row
    finally:
        srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="headrace-tiny-") as tmp:
        model = str(tiny_model(Path(tmp))) if args.mode == "frontend" else None
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for r in range(args.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):  # alternate the order per round
                row = one_run(model, n, args.mode)
                runs[n].append(row)
                print(f"round {r} api-server-count {n}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in row.items()), flush=True)  # fmt: skip
    med = {
        n: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for n, rows in runs.items()
    }
    print(f"\n{args.mode}: medians of {args.rounds} rounds, nproc {os.cpu_count()}")
    for n, m in med.items():
        print(f"  api-server-count {n}: {m['req_s']:.2f} req/s, {m['out_tok_s']:.1f} out tok/s, "
              f"p99 TTFT {m['p99_ttft_ms']:.0f} ms, CPU s: " + ", ".join(
                  f"{k[4:]} {v:.1f}" for k, v in m.items() if k.startswith("cpu_")))  # fmt: skip
    print(f"  ratio 2/1: {med[2]['req_s'] / med[1]['req_s']:.3f}x req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
