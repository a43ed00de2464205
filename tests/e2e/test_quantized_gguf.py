"""`headrace serve` on a GGUF in llama.cpp's Q4_K_M mix (Q4_K, Q5_K, Q6_K): served greedy text is
transformers' on the same file, and a prompt its tokenizer makes nothing of is a 400."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from tests.e2e.server import ServerProcess
from tests.model.tiny_gguf import Q, write_tiny_llama

PROMPTS = [[5, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
MAX_TOKENS = 12


@pytest.mark.parametrize("float_copies", ["1", "0"])
def test_served_k_quant_gguf_matches_transformers(tmp_path: Path, float_copies: str) -> None:
    """With the Q4_K linears' dequantized weights kept for prompt chunks, and without them
    (HEADRACE_GGUF_FLOAT_COPIES=0: the blocks alone)."""
    from transformers import AutoModelForCausalLM

    types = {"token_embd": Q.Q4_K, "output": Q.Q6_K, "ffn_down": Q.Q5_K, "attn_v.1": Q.Q6_K}
    path = write_tiny_llama(tmp_path / "tiny-q4_k_m.gguf", types)
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    expected = []
    with torch.inference_mode():
        for ids in PROMPTS:
            out = hf.eval().generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
            expected.append("".join(f"<t{t}>" for t in out[0, len(ids) :].tolist()))
    assert len(set(expected[0].split(">"))) > 3  # not one token over and over

    srv = ServerProcess(
        str(path), "--dtype", "float32", "--kv-cache-memory", "64MiB",
        env={"HEADRACE_GGUF_FLOAT_COPIES": float_copies},
    )  # fmt: skip
    try:
        srv.wait_ready()
        client = srv.client()
        for ids, text in zip(PROMPTS, expected, strict=True):
            got = client.completions.create(
                model=str(path), prompt=ids, max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert got.choices[0].text == text
            assert got.usage is not None and got.usage.completion_tokens == MAX_TOKENS
        with pytest.raises(openai.BadRequestError, match="empty once tokenized"):
            client.completions.create(model=str(path), prompt="<t5><t9>", max_tokens=4)
        log = srv.log.read_text()
        if "compute backend torch" not in log:  # the C kernels read the 4/8-bit blocks
            q4 = 8 if float_copies == "1" else 9  # without copies, one reads the embedding
            linears = f"8 decoder linears read their GGUF blocks (modules: {q4} Q4Linear, 3 Q8"
            assert linears in log and "the LM head its 8-bit ones" in log
            alone = "read their GGUF blocks alone, for every row"
            assert (alone in log) == (float_copies == "0")
    finally:
        srv.stop()
