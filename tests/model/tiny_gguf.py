"""Tiny random Llama GGUF files in llama.cpp's quantized types, for loader tests.

gguf's Python package decodes the K-quants but cannot make them, so the blocks are random bytes
with their float16 factors set to small values: valid blocks of the type, whatever their
integers, which is all a decoder sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

Q = GGMLQuantizationType
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 320
HEAD_DIM = HIDDEN // HEADS

# Where each type's block holds its float16 scale d (byte offset, largest value), and for the
# types with a second factor (weight = d q + min, or d sc q - dmin m), that one's offset and
# its ratio to d, which centres the weights near 0 as a quantizer's would.
_FACTORS = {
    Q.Q4_0: (0, 2e-2, None),
    Q.Q4_1: (0, 2e-2, (2, -7.5)),
    Q.Q5_0: (0, 1e-2, None),
    Q.Q8_0: (0, 2e-3, None),
    Q.Q4_K: (0, 1e-3, (2, 7.5)),
    Q.Q5_K: (0, 5e-4, (2, 15.5)),
    Q.Q6_K: (208, 5e-4, None),
}
LAYER_TENSORS = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
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

    put(at, d)
    if second is not None:
        put(second[0], d * second[1])
    return raw.reshape(n, -1)


def write_tiny_llama(
    path: Path, types: dict[str, GGMLQuantizationType], tied: bool = False, seed: int = 0
) -> Path:
    """A 2-layer Llama GGUF at `path`. `types` maps "token_embd", "output" and layer tensor
    names (layer 0's as "ffn_down", layer 1's as "ffn_down.1") to a type; the rest are Q4_K.
    With `tied`, no output tensor: the LM head is the embedding."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([1] * VOCAB)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    def add(name: str, key: str, n: int, k: int) -> None:
        qtype = types.get(key, Q.Q4_K)
        w.add_tensor(name, random_blocks(rng, qtype, n, k), raw_dtype=qtype)

    add("token_embd.weight", "token_embd", VOCAB, HIDDEN)
    if not tied:
        add("output.weight", "output", VOCAB, HIDDEN)
    w.add_tensor("output_norm.weight", norm())
    for i in range(LAYERS):
        for name, (n, k) in LAYER_TENSORS.items():
            add(f"blk.{i}.{name}.weight", name if i == 0 else f"{name}.{i}", n, k)
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
