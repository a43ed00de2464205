"""GGUF parsing and dequantization against the reference `gguf` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize

from headrace.model.gguf import GGUFWeights, dequantize, q4_blocks, q8_blocks, read_gguf
from headrace.model.loader import (
    available_memory,
    bundled_model_path,
    keeps_float_copies,
    resolve_model_path,
)
from headrace.model.registry import UnsupportedModelError
from tests.model.tiny_gguf import random_blocks

Q = GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_matches_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    raw = quantize(x, qtype)
    ours = dequantize(raw, qtype, (8, 64))
    ref = ref_dequantize(raw, qtype).reshape(8, 64)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS]
)
def test_k_quants_match_reference(qtype: GGMLQuantizationType) -> None:
    """llama.cpp's types that gguf cannot make: random blocks, decoded bit for bit alike."""
    raw = random_blocks(np.random.default_rng(2), qtype, 4, 512)
    ours = dequantize(raw.reshape(-1), qtype, (4, 512))
    ref = ref_dequantize(raw, qtype).reshape(4, 512)
    assert torch.equal(ours, torch.from_numpy(ref)) and float(ours.abs().max()) > 0


GRID_TYPES = [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M]


@pytest.mark.parametrize(
    "qtype",
    [Q.Q8_0, Q.Q6_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS, *GRID_TYPES],
)
def test_q8_blocks_give_the_dequantized_weight(qtype: GGMLQuantizationType) -> None:
    """int8 q times a scale per 32 weights (per 16 for Q6_K, Q2_K, Q3_K, IQ2_XS, IQ2_S, IQ1_M),
    plus an offset for Q5_1, Q5_K and Q2_K, is `dequantize`'s weight to the bit."""
    raw = random_blocks(np.random.default_rng(4), qtype, 8, 512)
    blocks = q8_blocks(raw, qtype, (8, 512))
    assert blocks is not None
    sixteen = (Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M)
    group = 16 if qtype in sixteen else 32
    scale, q, offset = blocks
    assert scale.shape == (8, 512 // group) and q.shape == (8, 512) and q.dtype == torch.int8
    assert (offset is not None) == (qtype in (Q.Q5_1, Q.Q5_K, Q.Q2_K))
    w = q.float().reshape(8, -1, group) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    assert torch.equal(w.reshape(8, 512), dequantize(raw, qtype, (8, 512)))
    assert q8_blocks(raw, Q.Q4_K, (8, 512)) is None


def test_unsupported_type_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="Q8_K"):
        dequantize(np.zeros(292, np.uint8), Q.Q8_K, (256,))


def test_parser_matches_reference_reader() -> None:
    path = bundled_model_path()
    meta, tensors = read_gguf(path)
    reader = GGUFReader(str(path))
    assert meta["llama.block_count"] == 30
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")
    for ref in reader.tensors[:20]:
        ours = tensors[ref.name]
        assert ours.shape == tuple(int(d) for d in reversed(ref.shape))
        assert ours.qtype == ref.tensor_type
        assert np.array_equal(
            np.asarray(ours.data).reshape(-1), np.asarray(ref.data).view(np.uint8).reshape(-1)
        )


def test_bundled_arch_config() -> None:
    arch = GGUFWeights(bundled_model_path()).arch_config()
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert arch.tie_word_embeddings and arch.eos_token_ids == (2,)
    assert arch.rope_theta == 100000.0


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(UnsupportedModelError, match=r"config\.json"):
        resolve_model_path(str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UnsupportedModelError, match=r"bad\.gguf"):
        GGUFWeights(bad)
    other = tmp_path / "m.gguf"
    w = GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported"):
        GGUFWeights(other)


def test_parameter_count_of_bundled_model() -> None:
    from headrace.model.registry import num_parameters

    arch = GGUFWeights(bundled_model_path()).arch_config()
    assert num_parameters(arch) == 134_515_008  # SmolLM2-135M: 272 tensors, tied head


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_q4_blocks_give_the_dequantized_weight(qtype: GGMLQuantizationType) -> None:
    """scale * q + offset, block by block, is `dequantize`'s weight to the bit (Q4_K's 256-weight
    super-blocks as eight blocks of 32)."""
    rng = np.random.default_rng(1)
    if qtype == Q.Q4_K:
        raw = random_blocks(rng, qtype, 8, 512)
    else:
        raw = quantize(rng.standard_normal((8, 512)).astype(np.float32), qtype)
    blocks = q4_blocks(raw, qtype, (8, 512))
    assert blocks is not None
    scale, offset, q = blocks
    assert scale.shape == offset.shape == (8, 16) and q.shape == (8, 512) and int(q.max()) <= 15
    w = q.float().reshape(8, 16, 32) * scale[..., None] + offset[..., None]
    assert torch.equal(w.reshape(8, 512), dequantize(raw, qtype, (8, 512)))
    assert q4_blocks(quantize(np.ones((2, 32), np.float32), Q.Q8_0), Q.Q8_0, (2, 32)) is None


def test_float_copies_kept_where_they_fit() -> None:
    """The loader's memory rule: dequantized copies of block-reading linears while they take at
    most a quarter of the memory available, and what this machine has is read."""
    assert keeps_float_copies(250, available=1000) and not keeps_float_copies(251, available=1000)
    assert keeps_float_copies(0, available=0)
    assert not keeps_float_copies(1, available=1000, setting=False)
    assert keeps_float_copies(999, available=1000, setting=True)
    # two engines on the machine (--data-parallel-size 2): each counts on half
    assert keeps_float_copies(125, available=1000, engines=2)
    assert not keeps_float_copies(126, available=1000, engines=2)
    meminfo = Path("/proc/meminfo").read_text().split()
    total = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    available = available_memory()
    assert available is not None and 0 < available <= total
