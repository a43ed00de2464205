"""Offline decode throughput of the engine vs transformers' batched generate vs this machine's
ceilings, all measured in one invocation.

    make bench                      # or: python benchmarks/offline_throughput.py --help

Workload: N prompts of exactly --input-len random tokens, --output-len tokens each (ignore_eos),
greedy. For each max_num_seqs in --batch-sizes: headrace's output tok/s (prefill included, as
vLLM's offline throughput counts it) and transformers' `generate` on the same prompts in batches
of that size. Ceilings: compute = GEMM FLOP/s (this dtype, all cores) / (2 x parameters);
bandwidth (batch 1) = memory read bandwidth / weight bytes, for the weights at the dtype's size
(what the issue's ceiling counts) and for the bytes a decode step's linears actually read (less
where the AMX linears keep a GGUF's 4-bit blocks). The GEMM is timed before and after
the runs and the faster kept: on a shared machine it has measured from 600 to 1615 GFLOP/s
between invocations, and a ceiling taken in a slow moment would flatter the percentages.
The ceiling counts 2 x parameters of FLOPs per output token only, while the run also prefills
every prompt token: the report says which share of the ceiling an engine would reach that ran
every linear FLOP of the workload (prompts included, attention left out) at the GEMM's rate.
transformers runs in float32, the setting it recommends for GGUF checkpoints (it keeps the
weights packed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# As `headrace serve` runs its engines (launch.py): idle OpenMP threads sleep instead of
# spinning, which is faster on this shared 2-core machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from headrace import envs
from headrace.model.backend import select_backend
from headrace.model.layers import AmxLinear, PackedLinear
from headrace.model.loader import bundled_model_path
from headrace.model.registry import ArchConfig, num_parameters
from headrace.offline import LLM
from headrace.wire.messages import SamplingParams


def _median_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gemm_flops(dtype: torch.dtype, n: int = 4096) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _median_time(lambda: torch.mm(a, b))


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _median_time(lambda: x.sum())


def decode_read_bytes(model: nn.Module) -> int:
    """The weight bytes a batch-1 decode step reads: every linear's weight as its kernel holds
    it (AMX tiles, 4-bit blocks, oneDNN's reorder, or the plain weight), biases aside. An
    AmxLinear's oneDNN copy serves prompt chunks only; the embedding gives one row a token."""
    prompt_only = {id(m.onednn) for m in model.modules() if isinstance(m, AmxLinear)}
    total = 0
    for m in model.modules():
        if id(m) in prompt_only:
            continue
        if isinstance(m, AmxLinear | PackedLinear):
            total += m.packed.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.nbytes
    return total


def full_speed_share(arch: ArchConfig, params: int, input_len: int, output_len: int) -> float:
    """The share of the compute ceiling reached by an engine that ran every linear FLOP of
    the workload at the GEMM probe's rate: the ceiling counts 2 x params FLOPs per output token,
    but each request's tokens go through the decoder layers input_len + output_len - 1 times
    (the prompt, then each output token but the last) and through the LM head output_len
    times. Attention's FLOPs are left out, so the true share is lower."""
    head = arch.vocab_size * arch.hidden_size
    layers = params - arch.hidden_size - head * (1 if arch.tie_word_embeddings else 2)
    flops = 2 * layers * (input_len + output_len - 1) + 2 * head * output_len
    return 2 * params * output_len / flops


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def num_prompts_for(batch: int, requested: int) -> int:
    # At batch 1 a full 64-prompt run takes minutes and measures the same steady state as 4.
    return requested if batch >= 8 else max(4, batch)


def run_headrace(args, dtype: str, batch: int, prompts: list[list[int]]) -> float:
    llm = LLM(dtype=dtype, max_num_seqs=batch, enable_prefix_caching=False)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == len(prompts) * args.output_len
    return produced / elapsed


def run_transformers(model, batch: int, prompts: list[list[int]], output_len: int) -> float:
    produced, elapsed = 0, 0.0
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:1]), max_new_tokens=2, do_sample=False, pad_token_id=2)
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            t = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=2,
            )
            elapsed += time.perf_counter() - t
            produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return produced / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    envs.cap_libraries_for_cpu_backend()  # before the first matmul
    torch_dtype = select_backend(torch.device("cpu")).dtype(args.dtype)
    dtype = str(torch_dtype).removeprefix("torch.")
    batches = [int(b) for b in args.batch_sizes.split(",")]

    flops_before = gemm_flops(torch_dtype)
    bandwidth = read_bandwidth()
    probe = LLM(dtype=dtype, num_kv_blocks=64)  # type: ignore[arg-type]
    arch = probe.engine.runner.arch
    params = num_parameters(arch)
    vocab = arch.vocab_size
    full_speed = full_speed_share(arch, params, args.input_len, args.output_len)
    read_bytes = decode_read_bytes(probe.engine.runner.model)
    del probe
    bandwidth_ceiling = bandwidth / (params * torch_dtype.itemsize)
    read_ceiling = bandwidth / read_bytes
    print(f"dtype {dtype}, {torch.get_num_threads()} threads, {params / 1e6:.1f}M parameters")
    print(f"GEMM {flops_before / 1e9:.0f} GFLOP/s (before the runs)")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 ceiling {bandwidth_ceiling:.0f} "
          f"for {dtype} weights, {read_ceiling:.0f} for the {read_bytes / 1e6:.0f} MB of weights "
          "a decode step reads")  # fmt: skip

    hf = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        # transformers keeps GGUF weights packed and computes in float32: its fastest setting.
        path = bundled_model_path()
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()

    rows = []
    for batch in batches:
        n = num_prompts_for(batch, args.num_prompts)
        prompts = prompts_for(n, args.input_len, vocab, seed=batch)
        ours = run_headrace(args, dtype, batch, prompts)
        theirs = run_transformers(hf, batch, prompts, args.output_len) if hf is not None else None
        rows.append(
            {
                "max_num_seqs": batch,
                "prompts": n,
                "headrace_tok_s": round(ours, 1),
                "transformers_tok_s": None if theirs is None else round(theirs, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    flops_after = gemm_flops(torch_dtype)
    flops = max(flops_before, flops_after)
    compute_ceiling = flops / (2 * params)
    print(f"GEMM {flops_after / 1e9:.0f} GFLOP/s (after the runs); the ceiling takes the faster, "
          f"{flops / 1e9:.0f} GFLOP/s -> {compute_ceiling:.0f} tok/s")  # fmt: skip
    for r in rows:
        ceiling = read_ceiling if r["max_num_seqs"] == 1 else compute_ceiling
        r["compute_ceiling_pct"] = round(100 * r["headrace_tok_s"] / compute_ceiling, 1)
        r["ceiling_tok_s"] = round(ceiling, 1)

    print()
    print("| max_num_seqs | prompts | headrace tok/s | transformers tok/s | vs transformers "
          "| % of compute ceiling |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        hf_s = r["transformers_tok_s"]
        ratio = f"{r['headrace_tok_s'] / hf_s:.2f}x" if hf_s else "-"
        print(
            f"| {r['max_num_seqs']} | {r['prompts']} | {r['headrace_tok_s']} | {hf_s or '-'} "
            f"| {ratio} | {r['compute_ceiling_pct']}% |"
        )
    print(f"\ncompute ceiling {compute_ceiling:.0f} tok/s, batch-1 bandwidth ceiling "
          f"{bandwidth_ceiling:.0f} tok/s ({dtype} weights), {read_ceiling:.0f} tok/s (the "
          f"{read_bytes / 1e6:.0f} MB a decode step reads)")  # fmt: skip
    print(f"an engine running every linear FLOP of this workload (prompt tokens included) at the "
          f"GEMM's rate would reach {100 * full_speed:.1f}% of the compute ceiling")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": dtype, "gemm_flops": flops, "gemm_flops_before": flops_before,
                       "gemm_flops_after": flops_after, "read_bandwidth": bandwidth,
                       "decode_read_bytes": read_bytes, "full_speed_share": full_speed,
                       "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
