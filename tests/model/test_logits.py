"""Our forward pass equals transformers' on tiny random-weight models written as safetensors,
and as GGUF files in llama.cpp's quantized types."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import MistralForCausalLM as HFMistral
from transformers import Qwen2ForCausalLM as HFQwen2

from headrace.model.attention import AttentionMetadata, build_group
from headrace.model.backend import select_backend
from headrace.model.layers import BlockEmbedding, Q4Linear, Q8Linear, reads_blocks
from headrace.model.loader import load_model, read_arch
from headrace.model.ops import ops_for
from tests.backends import RUNNABLE, amx_kernels
from tests.model.tiny_gguf import GGUF_MIXES, Q, write_tiny_llama

BLOCK = 4
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _llama3() -> LlamaConfig:
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
        "rope_theta": 500000.0,
    }
    cfg = LlamaConfig(**COMMON, tie_word_embeddings=True)
    cfg.rope_parameters = rope
    return cfg


CASES = {
    "llama": (HFLlama, lambda: LlamaConfig(**COMMON, tie_word_embeddings=False)),
    "llama3-rope-tied": (HFLlama, _llama3),
    "qwen2": (HFQwen2, lambda: Qwen2Config(**COMMON, tie_word_embeddings=False)),
    "mistral": (HFMistral, lambda: MistralConfig(**COMMON, sliding_window=None)),
}


def _save(tmp_path: Path, name: str) -> tuple[Path, torch.nn.Module]:
    hf_cls, make_cfg = CASES[name]
    torch.manual_seed(0)
    model = hf_cls(make_cfg()).float().eval()
    with torch.no_grad():  # random init leaves biases at 0; make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    out = tmp_path / name
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def _meta(lens, starts, tables, groups, kernels=None):
    ctx = [s + n for s, n in zip(starts, lens, strict=True)]
    group, slots = build_group(0, lens, ctx, tables, BLOCK, groups, padded=kernels is None)
    return AttentionMetadata(slots, [group], ops_for(kernels))


def _cpu(name: str):
    return select_backend(torch.device("cpu"), name)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path: Path, name: str, backend: str) -> None:
    """Every backend this CPU runs (HEADRACE_CPU_BACKEND's choices), prompt and decode."""
    cpu = _cpu(backend)
    path, hf = _save(tmp_path, name)
    arch, source = read_arch(path)
    assert arch.qkv_bias == (name == "qwen2")
    if name == "llama3-rope-tied":
        assert arch.rope_scaling is not None and arch.rope_scaling["rope_type"] == "llama3"
        assert arch.tie_word_embeddings
    ours = load_model(path, arch, source, torch.float32, cpu, 256).model
    g = arch.num_heads // arch.num_kv_heads
    shape = (2, 64, BLOCK, arch.num_kv_heads, arch.head_dim)
    caches = [torch.zeros(shape) for _ in range(arch.num_layers)]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (7, 13, 3)]
    tables = [[0, 1, 2, 3], [10, 4, 11, 12, 13], [20, 21]]
    # Prefill all three at once (mixed lengths, one attention group), then one decode step each.
    with torch.inference_mode():
        lens = [len(s) - 1 for s in seqs]
        meta = _meta(lens, [0, 0, 0], tables, g, cpu.kernels)
        ids = torch.tensor([t for s in seqs for t in s[:-1]])
        pos = torch.tensor([p for n in lens for p in range(n)])
        prefill = ours.compute_logits(ours(ids, pos, caches, meta))
        meta = _meta([1, 1, 1], lens, tables, g, cpu.kernels)
        last = torch.tensor([s[-1] for s in seqs])
        decode = ours.compute_logits(ours(last, torch.tensor(lens), caches, meta))
        offset = 0
        for i, s in enumerate(seqs):
            ref = hf(torch.tensor([s])).logits[0]
            got = prefill[offset : offset + lens[i]]
            offset += lens[i]
            torch.testing.assert_close(got, ref[:-1], atol=1e-4, rtol=0)
            torch.testing.assert_close(decode[i], ref[-1], atol=1e-4, rtol=0)


def test_bf16_linears_on_amx_or_onednn_alone(tmp_path: Path) -> None:
    """On the amx backend bf16 linears are AmxLinear, on avx512 (the same CPU) oneDNN's alone;
    both give transformers' float32 logits to bf16 accuracy."""
    amx_kernels()  # (skips without AMX)
    path, hf = _save(tmp_path, "qwen2")  # q/k/v biases: the kernel's bias path too
    arch, source = read_arch(path)
    amx = load_model(path, arch, source, torch.bfloat16, _cpu("amx"), 256).model
    onednn = load_model(path, arch, source, torch.bfloat16, _cpu("avx512"), 256).model
    kinds = [
        {type(m).__name__ for n, m in model.named_modules() if not n.endswith(".onednn")}
        for model in (amx, onednn)
    ]  # an AmxLinear's own oneDNN copy left out
    assert "AmxLinear" in kinds[0] and "PackedLinear" not in kinds[0]
    assert "AmxLinear" not in kinds[1] and "PackedLinear" in kinds[1]
    seq = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    shape = (2, 64, BLOCK, arch.num_kv_heads, arch.head_dim)
    with torch.inference_mode():
        ref = hf(torch.tensor([seq])).logits[0]
        for model in (amx, onednn):
            caches = [torch.zeros(shape) for _ in range(arch.num_layers)]
            meta = _meta([len(seq)], [0], [[0, 1, 2]], arch.num_heads // arch.num_kv_heads)
            hidden = model(torch.tensor(seq), torch.arange(len(seq)), caches, meta)
            got = model.compute_logits(hidden).float()
            torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)  # logits ~0.4 at most
            # greedy's argmax straight from the LM head where it is an AmxLinear: the same tokens
            tokens = model.greedy_tokens(hidden)
            if model is amx:
                assert tokens is not None and torch.equal(tokens, got.argmax(dim=-1))
            else:
                assert tokens is None


@pytest.mark.parametrize("float_copies", [True, False])
@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("mix", list(GGUF_MIXES))
def test_quantized_gguf_matches_transformers(
    tmp_path: Path, mix: str, backend: str, float_copies: bool
) -> None:
    """A GGUF in llama.cpp's K-quant and 5-bit types loads, and gives transformers' logits on
    the same file; the 4-bit and 8-bit linears (LM head included) read their blocks on kernel
    backends,
    with their dequantized weights for prompt chunks over 128 rows, or (float_copies=False,
    what the loader picks where those would not fit in memory) their blocks alone."""
    from transformers import AutoModelForCausalLM

    types, default, tied, kinds = GGUF_MIXES[mix]
    path = write_tiny_llama(tmp_path / f"{mix}.gguf", types, tied=tied, default=default)
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    cpu = _cpu(backend)
    arch, source = read_arch(path)
    assert arch.tie_word_embeddings == tied
    ours = load_model(path, arch, source, torch.float32, cpu, 256, float_copies=float_copies).model
    found = Counter(type(m).__name__ for m in ours.modules() if reads_blocks(m))
    alone = cpu.kernels is not None and not float_copies
    # without the copies the embedding is read from blocks too: the tied head's, or its own
    assert isinstance(ours.embed_tokens, BlockEmbedding) == alone
    reader = "Q4Linear" if types["token_embd"] == Q.Q4_K else "Q8Linear"
    extra = {reader: 1} if alone and not tied else {}
    assert found == ({} if cpu.kernels is None else Counter(kinds) + Counter(extra))
    blocks = [m for m in ours.modules() if isinstance(m, Q4Linear | Q8Linear)]
    assert all((m.large is None) == (not float_copies) for m in blocks if m is not ours.lm_head)
    if alone and tied:  # the head is the embedding: neither has the float32 table
        assert cast(Q4Linear, ours.lm_head).large is None
    floats = sum(p.numel() for p in ours.parameters())
    full = sum(p.numel() for p in hf.parameters())
    assert floats == full if float_copies or not blocks else floats < full / 2
    n = 150  # a prompt chunk past the blocks' 128 rows where the float copies are kept
    seq = torch.randint(0, arch.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(3))
    shape = (2, 64, BLOCK, arch.num_kv_heads, arch.head_dim)
    caches = [torch.zeros(shape) for _ in range(arch.num_layers)]
    tables = [list(range(40))]
    with torch.inference_mode():
        ref = hf.eval()(seq[None]).logits[0]
        g = arch.num_heads // arch.num_kv_heads
        meta = _meta([n], [0], tables, g, cpu.kernels)
        prefill = ours.compute_logits(ours(seq[:-1], torch.arange(n), caches, meta))
        meta = _meta([1], [n], tables, g, cpu.kernels)
        decode = ours.compute_logits(ours(seq[-1:], torch.tensor([n]), caches, meta))
    top = float(ref.abs().max())
    assert top > 1  # logits of some size: a real comparison
    # float32 sums in another order: ~2e-5 of the logits' size apart, ~1e-4 allowed
    torch.testing.assert_close(prefill, ref[:-1], atol=1e-4 * top, rtol=0)
    torch.testing.assert_close(decode[0], ref[-1], atol=1e-4 * top, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_float16_weights_on_the_torch_path(tmp_path: Path, name: str) -> None:
    """float16 weights (`--dtype half` off CPU, where the torch backend runs): the torch ops
    that CUDA runs, here on the CPU, stay close to float32's logits and pick the same tokens."""
    torch_cpu = _cpu("torch")
    path, hf = _save(tmp_path, name)
    arch, source = read_arch(path)
    ours = load_model(path, arch, source, torch.float16, torch_cpu, 256).model
    assert all(p.dtype == torch.float16 for n, p in ours.named_parameters() if "norm" not in n)
    g = arch.num_heads // arch.num_kv_heads
    shape = (2, 64, BLOCK, arch.num_kv_heads, arch.head_dim)
    caches = [torch.zeros(shape, dtype=torch.float16) for _ in range(arch.num_layers)]
    seq = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        meta = _meta([11], [0], [[0, 1, 2]], g)
        prefill = ours.compute_logits(ours(seq[:-1], torch.arange(11), caches, meta)).float()
        meta = _meta([1], [11], [[0, 1, 2]], g)
        decode = ours.compute_logits(ours(seq[-1:], torch.tensor([11]), caches, meta)).float()
        ref = hf(seq[None]).logits[0]
    got = torch.cat([prefill, decode])
    err, top = float((got - ref).abs().max()), float(ref.abs().max())
    assert 0 < err < 0.01 * top, (err, top)
