"""Memory and speed of a larger GGUF with and without the dequantized copies of its 4-bit linears.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/gguf_memory.py
        [--mix q4_k_m] [--shape 3072,8192,28,24,8,128256] [--prompt 256] [--steps 8]
        [--file /tmp/headrace-llama-3b-q4_k_m.gguf]

Writes (once, or reuses `--file`) a random-weight Llama GGUF of `--shape` (hidden, ffn, layers,
heads, KV heads, vocab; the default is Llama-3.2-3B's) in llama.cpp's Q4_K_M mix (`--mix`):
Q4_K linears, Q6_K for attn_v and ffn_down in the layers llama.cpp gives more bits (the first
and last eighth, and every third between), a tied Q6_K embedding; or Q5_K_M's, the same with
Q5_K for Q4_K; or Q3_K_M's, Q3_K linears with attn_v and ffn_down in Q5_K in those layers and
Q4_K elsewhere, attn_output in Q4_K. Then, in a fresh process each, loads
it with HEADRACE_GGUF_FLOAT_COPIES=1 (the linears keep their dequantized float32 weights for
prompt chunks over 128 rows) and =0 (the blocks alone, which the loader picks by itself where
the copies would take over a quarter of the memory available), and reports: load seconds, peak
and settled RSS, one prefill step of `--prompt` tokens, and the median of `--steps` decode
steps of one sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) >> 10
    return -1


def child(path: str, prompt: int, steps: int) -> None:
    """Load, time, and print one JSON line (runs with HEADRACE_GGUF_FLOAT_COPIES set)."""
    import random

    from headrace.offline import LLM
    from headrace.wire.messages import EngineCoreRequest, SamplingParams

    t = time.perf_counter()
    llm = LLM(path, dtype="float32", max_model_len=prompt + steps + 8, kv_cache_memory=256 << 20)
    load = time.perf_counter() - t
    engine = llm.engine
    rng = random.Random(0)
    vocab = engine.runner.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    request = EngineCoreRequest(
        request_id="0",
        prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt)],
        sampling_params=params,
    )
    engine.add_request(request)
    times = []
    while engine.scheduler.waiting or engine.scheduler.running:
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "load_s": load,
                "peak_rss_mib": _rss_mib("VmHWM"),
                "rss_mib": _rss_mib("VmRSS"),
                "prefill_s": times[0],
                "decode_ms": 1e3 * statistics.median(times[1:]),
            }
        )
    )


def write(path: Path, shape: list[int], mix: str) -> None:
    from tests.model.tiny_gguf import Q, Shape, write_tiny_llama

    s = Shape(*shape)
    eighth = s.layers // 8
    more_bits = [
        i for i in range(s.layers) if i < eighth or i >= s.layers - eighth or (i - eighth) % 3 == 2
    ]
    types = {"token_embd": Q.Q6_K}
    for i in more_bits:
        for name in ("attn_v", "ffn_down"):
            types[name if i == 0 else f"{name}.{i}"] = Q.Q6_K
    if mix == "q3_k_m":  # as llama.cpp's: 3-bit, those layers' v and down in 5, the rest's in 4
        rest = {"token_embd": Q.Q6_K}
        for i in range(s.layers):
            for name in ("attn_v", "ffn_down", "attn_output"):
                key = name if i == 0 else f"{name}.{i}"
                wide = i in more_bits and name != "attn_output"
                rest[key] = Q.Q5_K if wide else Q.Q4_K
        types = rest
    default = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q3_k_m": Q.Q3_K}[mix]
    write_tiny_llama(path, types, tied=True, shape=s, default=default)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="3072,8192,28,24,8,128256")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mix", choices=("q4_k_m", "q5_k_m", "q3_k_m"), default="q4_k_m")
    p.add_argument("--file", help="default: /tmp/headrace-llama-3b-MIX.gguf")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.file = args.file or f"/tmp/headrace-llama-3b-{args.mix}.gguf"
    if args.child:
        child(args.file, args.prompt, args.steps)
        return
    path = Path(args.file)
    if not path.is_file():
        t = time.perf_counter()
        write(path, [int(v) for v in args.shape.split(",")], args.mix)
        print(f"wrote {path} ({path.stat().st_size >> 20} MiB) in {time.perf_counter() - t:.0f} s")
    print(f"{path}: {path.stat().st_size >> 20} MiB; prompt {args.prompt} tokens, 1 sequence")
    print("| float copies | load | peak RSS | RSS after load | prefill step | decode step |")
    print("|---|---|---|---|---|---|")
    for copies in ("1", "0"):
        env = {**os.environ, "HEADRACE_GGUF_FLOAT_COPIES": copies}
        cmd = [sys.executable, __file__, "--child", "--file", str(path)]
        cmd += ["--prompt", str(args.prompt), "--steps", str(args.steps)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"| {copies} | failed ({out.returncode}): {out.stderr.strip()[-300:]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {copies} | {r['load_s']:.0f} s | {r['peak_rss_mib']} MiB | {r['rss_mib']} MiB "
            f"| {r['prefill_s']:.2f} s | {r['decode_ms']:.0f} ms |"
        )


if __name__ == "__main__":
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH
    main()
