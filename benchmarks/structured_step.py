"""Decode step time with and without structured outputs, and grammar compile times.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/structured_step.py [--seqs 16]
        [--steps 30] [--rounds 3]

A batch of `--seqs` chat requests decodes in four modes, alternated `--rounds` times so drift
on a shared machine hits all alike: greedy and temperature-1 sampling, each free and with every
sequence constrained to a JSON schema (an array of at least 30 book objects, so no request
ends inside the window). Reported: the median step of each mode over all rounds, and the ratio
constrained / free. Then: xgrammar's first compile (import and tokenizer info included), a cold
compile of a new schema, and a cache hit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from headrace.engine.structured import Grammars
from headrace.model.loader import resolve_model_path
from headrace.offline import LLM
from headrace.wire.messages import EngineCoreRequest, SamplingParams, StructuredOutputsParams

BOOK = {
    "type": "object",
    "required": ["title", "year", "genre", "pages"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "genre": {"type": "string", "enum": ["novel", "poetry", "history", "science"]},
        "pages": {"type": "integer"},
    },
}
BOOKS = {"type": "array", "items": BOOK, "minItems": 30}


def time_mode(llm: LLM, prompt: list[int], params: SamplingParams, seqs: int, steps: int) -> float:
    engine = llm.engine
    ids = [f"b{time.monotonic_ns()}-{i}" for i in range(seqs)]
    for rid in ids:
        engine.add_request(
            EngineCoreRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params)
        )
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
        if engine.blocked():
            time.sleep(0.001)
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    running = len(engine.scheduler.running)
    engine.abort(ids)
    assert running == seqs, f"only {running} of {seqs} sequences were still decoding"
    return statistics.median(times)


def compile_times(llm: LLM) -> None:
    arch = llm.engine.runner.arch
    grammars = Grammars(resolve_model_path(None), arch.vocab_size, arch.eos_token_ids)
    t = time.perf_counter()
    grammars.attach(StructuredOutputsParams(json=BOOK)).future.result()
    first = time.perf_counter() - t
    t = time.perf_counter()
    grammars.attach(StructuredOutputsParams(json=BOOKS)).future.result()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    state = grammars.attach(StructuredOutputsParams(json=BOOKS))
    assert state.ready
    cached = time.perf_counter() - t
    print(
        f"compile: first (import + tokenizer info + schema) {first * 1e3:.0f} ms, "
        f"cold schema {cold * 1e3:.1f} ms, cached {cached * 1e3:.3f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    llm = LLM(max_num_seqs=args.seqs, max_model_len=1024, enable_prefix_caching=False)
    conv = [{"role": "user", "content": "List thirty books as JSON: title, year, genre, pages."}]
    text = llm.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    prompt = list(llm.tokenizer(text, add_special_tokens=False).input_ids)
    spec = StructuredOutputsParams(json=BOOKS)
    modes = {
        "greedy free": SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True),
        "greedy json": SamplingParams(temperature=0.0, max_tokens=900, structured_outputs=spec),
        "t=1 free": SamplingParams(temperature=1.0, seed=1, max_tokens=900, ignore_eos=True),
        "t=1 json": SamplingParams(
            temperature=1.0, seed=1, max_tokens=900, structured_outputs=spec
        ),
    }
    time_mode(llm, prompt, modes["greedy json"], args.seqs, 2)  # compile + warm up
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, params in modes.items():
            samples[name].append(time_mode(llm, prompt, params, args.seqs, args.steps))
    med = {m: statistics.median(v) for m, v in samples.items()}
    print(f"{args.seqs} sequences, {torch.get_num_threads()} threads, {llm.engine.runner.dtype}")
    for name in modes:
        runs = " ".join(f"{1e3 * v:.1f}" for v in samples[name])
        print(f"  {name:12s} median step {1e3 * med[name]:6.1f} ms   (rounds: {runs})")
    for kind in ("greedy", "t=1"):
        ratio = med[f"{kind} json"] / med[f"{kind} free"]
        print(f"  {kind}: constrained / free = {ratio:.3f}")
    compile_times(llm)


if __name__ == "__main__":
    main()
