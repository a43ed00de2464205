"""Tiny random Llama GGUF files in llama.cpp's quantized types, for loader tests.

gguf's Python package decodes the K-quants but cannot make them, so the blocks are random bytes
with their float16 factors set to small values: valid blocks of the type, whatever their
integers, which is all a decoder sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

Q = GGMLQuantizationType


class Shape(NamedTuple):
    """A Llama's sizes (head size 64)."""

    hidden: int = 256
    ffn: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 320

    def tensors(self) -> dict[str, tuple[int, int]]:
        """A decoder layer's linears, llama.cpp's names, as torch shapes [out, in]."""
        kv = self.kv_heads * self.hidden // self.heads
        return {
            "attn_q": (self.hidden, self.hidden),
            "attn_k": (kv, self.hidden),
            "attn_v": (kv, self.hidden),
            "attn_output": (self.hidden, self.hidden),
            "ffn_gate": (self.ffn, self.hidden),
            "ffn_up": (self.ffn, self.hidden),
            "ffn_down": (self.hidden, self.ffn),
        }


TINY = Shape()

# Where each type's block holds its float16 scale d (byte offset, largest value), and for the
# types with a second factor (weight = d q + min, or d sc q - dmin m), that one's offset and
# its ratio to d, which centres the weights near 0 as a quantizer's would.
_FACTORS = {
    Q.Q4_0: (0, 2e-2, None),
    Q.Q4_1: (0, 2e-2, (2, -7.5)),
    Q.Q5_0: (0, 1e-2, None),
    Q.Q5_1: (0, 1e-2, (2, -15.5)),
    Q.Q8_0: (0, 2e-3, None),
    Q.Q4_K: (0, 1e-3, (2, 7.5)),
    Q.Q5_K: (0, 5e-4, (2, 15.5)),
    Q.Q6_K: (208, 5e-4, None),
    Q.Q2_K: (80, 1e-3, (82, 1.5)),
    Q.Q3_K: (108, 2e-4, None),
    Q.IQ4_NL: (0, 2e-4, None),
    Q.IQ4_XS: (0, 1e-5, None),
    Q.IQ2_XXS: (0, 1e-4, None),
    Q.IQ2_XS: (0, 1e-4, None),
    Q.IQ2_S: (0, 1e-4, None),
    Q.IQ3_XXS: (0, 1e-4, None),
    Q.IQ3_S: (0, 1e-4, None),
    Q.IQ1_S: (0, 2e-3, None),
    Q.IQ1_M: (None, 2e-3, None),  # its float16 d: the top nibbles of its last four 16-bit words
}


def random_blocks(
    rng: np.random.Generator, qtype: GGMLQuantizationType, n: int, k: int
) -> np.ndarray:
    """An [n, k] matrix of `qtype` as bytes [n, row bytes]: random integers, small factors."""
    size, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n * k // size, nbytes), dtype=np.uint8)
    at, top, second = _FACTORS[qtype]
    d = rng.random(len(raw)) * top

    def put(offset: int, values: np.ndarray) -> None:
        raw[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)

    if at is not None:
        put(at, d)
    else:
        bits = d.astype(np.float16).view(np.uint16).astype(np.uint16)
        words = raw[:, -8:].copy().view(np.uint16) & 0x0FFF
        for i in range(4):
            words[:, i] |= ((bits >> (4 * i)) & 0xF) << 12
        raw[:, -8:] = words.view(np.uint8)
    if second is not None:
        put(second[0], d * second[1])
    return raw.reshape(n, -1)


def write_tiny_llama(
    path: Path,
    types: dict[str, GGMLQuantizationType],
    tied: bool = False,
    seed: int = 0,
    shape: Shape = TINY,
    default: GGMLQuantizationType = Q.Q4_K,
) -> Path:
    """A Llama GGUF at `path` (2 layers unless `shape` says otherwise). `types` maps
    "token_embd", "output" and layer tensor names (layer 0's as "ffn_down", layer 1's as
    "ffn_down.1") to a type; the rest are `default`. With `tied`, no output tensor: the LM
    head is the embedding."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(shape.layers)
    w.add_context_length(4096 if shape != TINY else 256)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.hidden // shape.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(shape.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(shape.vocab)])
    w.add_token_scores([0.0] * shape.vocab)
    w.add_token_types([1] * shape.vocab)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(shape.hidden)).astype(np.float32)

    def add(name: str, key: str, n: int, k: int) -> None:
        qtype = types.get(key, default)
        w.add_tensor(name, random_blocks(rng, qtype, n, k), raw_dtype=qtype)

    add("token_embd.weight", "token_embd", shape.vocab, shape.hidden)
    if not tied:
        add("output.weight", "output", shape.vocab, shape.hidden)
    w.add_tensor("output_norm.weight", norm())
    for i in range(shape.layers):
        for name, (n, k) in shape.tensors().items():
            add(f"blk.{i}.{name}.weight", name if i == 0 else f"{name}.{i}", n, k)
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# llama.cpp's mixes: a Q4_K_M file keeps most linears Q4_K and some Q5_K / Q6_K, a Q5_K_M file
# Q5_K and Q6_K; older and smaller files mix Q4_0, Q5_0 and Q8_0. Expected: the modules that
# read blocks (a decoder linear whose parts all have 4-bit blocks is a Q4Linear, 8-bit (int8:
# Q8_0, Q6_K, the 5-bit types) a Q8Linear, both a SplitLinear of one a part; the LM head reads
# its own where it has them), and the kind that reads an untied embedding without float copies.
GGUF_MIXES = {
    "q4_k_m": (
        dict(token_embd=Q.Q4_K, output=Q.Q6_K, ffn_down=Q.Q5_K, **{"attn_v.1": Q.Q6_K}),
        Q.Q4_K,
        False,
        {"Q4Linear": 3 + 2 + 3, "Q8Linear": 1 + 1 + 1, "SplitLinear": 1},
    ),
    "q5_k_m": (
        dict(token_embd=Q.Q5_K, output=Q.Q6_K, ffn_down=Q.Q6_K, **{"attn_v.1": Q.Q6_K}),
        Q.Q5_K,
        False,
        {"Q8Linear": 4 + 4 + 1},
    ),
    "q3_k_m": (
        dict(
            token_embd=Q.Q3_K,
            output=Q.Q6_K,
            attn_v=Q.Q5_K,
            ffn_down=Q.Q4_K,
            **{"attn_v.1": Q.Q4_K, "ffn_down.1": Q.Q5_K},
        ),
        Q.Q3_K,
        False,
        {"Q8Linear": 3 + 2 + 3 + 1, "Q4Linear": 1 + 1, "SplitLinear": 1},
    ),
    "q2_k-with-iq4": (
        dict(
            token_embd=Q.Q2_K,
            output=Q.Q6_K,
            attn_v=Q.Q3_K,
            ffn_down=Q.IQ4_XS,
            **{"attn_q.1": Q.IQ4_NL, "ffn_down.1": Q.IQ4_NL},
        ),
        Q.Q2_K,
        False,
        {"Q8Linear": 4 + 4 + 1},
    ),
    "grid-i-quants": (
        dict(
            token_embd=Q.IQ2_XXS,
            output=Q.Q6_K,
            attn_v=Q.IQ3_S,
            ffn_down=Q.IQ3_XXS,
            **{"attn_q.1": Q.IQ1_S, "ffn_gate.1": Q.IQ1_M, "attn_output.1": Q.IQ2_XS},
            **{"ffn_up.1": Q.IQ2_S},
        ),
        Q.IQ2_XXS,
        False,
        {"Q8Linear": 4 + 4 + 1},
    ),
    "tied-q4_k-with-q5_0-q5_1-q8_0": (
        dict(
            token_embd=Q.Q4_K,
            attn_k=Q.Q4_0,
            ffn_up=Q.Q5_0,
            **{"attn_output.1": Q.Q8_0},
            **{"ffn_down.1": Q.Q5_1},
        ),
        Q.Q4_K,
        True,
        {"Q4Linear": 4 + 2 + 1, "Q8Linear": 1 + 2, "SplitLinear": 1},
    ),
}
