"""decode_layers (model/fused.py) against the layer-by-layer path it replaces: the same bits."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import Qwen2ForCausalLM as HFQwen2

from headrace.model.attention import AttentionMetadata, build_group
from headrace.model.backend import backend_kernels, select_backend
from headrace.model.fused import FusedDecode
from headrace.model.layers import AmxLinear, can_pack_linears, pack_linears, reads_blocks
from headrace.model.loader import bundled_model_path, load_model, read_arch, use_block_linears
from headrace.model.ops import ops_for
from tests.backends import KERNEL_BUILDS, amx_kernels
from tests.model.tiny_gguf import GGUF_MIXES, write_tiny_llama

BLOCK = 4
CASES = {
    # head_dim 16: decode attention's generic loop; q/k/v biases
    "qwen2-d16": lambda: Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
    # head_dim 64 with 3 query heads per KV head, as SmolLM2: the one-pass attention
    "llama-d64": lambda: LlamaConfig(
        vocab_size=160, hidden_size=192, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True,
    ),
}  # fmt: skip


# the fused step's two kinds of linears: AMX tiles (bf16), and the 4-bit blocks on each kernel
# build this CPU runs (its vector path and plain-C twin), in a float32 model and a bf16 one (not
# on the amx build, whose bf16 linears are AMX tiles)
PATHS = [
    "amx",
    *(f"q4-{b}-{t}" for b in KERNEL_BUILDS for t in ("float32", "bfloat16")
      if (b, t) != ("amx", "bfloat16")),
]  # fmt: skip
# the builds whose float32 block linears stop at 16 rows, where torch's float32 matmul has
# AVX-512 too and is faster from 32 rows (layers._BlockLinear)
AVX512_BUILDS = [b for b in KERNEL_BUILDS if backend_kernels(b).vector_bits == 512]
# where the blocks take up to 128 rows: float32 weights on a build without AVX-512, and bf16
# ones where oneDNN cannot pack them (a CPU without bf16 support)
WIDE_Q4 = [
    p for p in PATHS[1:]
    if (p.endswith("float32") and p.split("-")[1] not in AVX512_BUILDS)
    or (p.endswith("bfloat16") and not can_pack_linears(torch.bfloat16, torch.device("cpu")))
]  # fmt: skip


def _unpacked(load):
    """`load()` with the linears left as nn.Linear where load_model would pack bf16 ones for
    oneDNN, so that _quantize can give them blocks first, as the loader does a GGUF's."""
    with mock.patch("headrace.model.loader.can_pack_linears", return_value=False):
        return load()


def _quantize(model, kernels) -> None:
    """Every decoder linear as a Q4Linear with Q4_1 blocks made from its weight (as a GGUF file
    would hold them), as the loader gives a GGUF's, then bf16 linears packed for oneDNN where it
    packs them (the loader's order), and the fused step over them."""

    def blocks(name: str):
        if not name.startswith("layers."):
            return None
        w = model.get_submodule(name).weight.float().reshape(-1, 32)
        low, high = w.min(-1).values, w.max(-1).values
        scale = (high - low).clamp_min(1e-8) / 15
        q = ((w - low[:, None]) / scale[:, None]).round().clamp(0, 15).to(torch.uint8)
        rows = model.get_submodule(name).weight.shape[0]
        return [(scale.reshape(rows, -1), low.reshape(rows, -1), q.reshape(rows, -1))]

    assert use_block_linears(model, kernels, blocks) == 4 * len(model.layers)
    assert all(layer.compute_dtype == torch.float32 for layer in model.layers)
    if can_pack_linears(model.dtype, torch.device("cpu")):
        pack_linears(model, kernels, float_out=("lm_head",))
    model.fused_decode = FusedDecode.build(model, kernels)


def _load(tmp_path: Path, name: str, path: str = "amx"):
    hf_cls = HFQwen2 if name.startswith("qwen2") else HFLlama
    torch.manual_seed(0)
    hf = hf_cls(CASES[name]()).float().eval()
    with torch.no_grad():  # random init leaves biases at 0; make them matter
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / name, safe_serialization=True)
    arch, source = read_arch(tmp_path / name)
    _, build, dtype_name = path.split("-") if path != "amx" else ("", "amx", "bfloat16")
    cpu = select_backend(torch.device("cpu"), build)
    dtype = getattr(torch, dtype_name)
    if path == "amx":
        return load_model(tmp_path / name, arch, source, dtype, cpu, 256).model, arch
    model = _unpacked(lambda: load_model(tmp_path / name, arch, source, dtype, cpu, 256).model)
    _quantize(model, cpu.kernels)
    return model, arch


def _kernels(path: str):
    return amx_kernels() if path == "amx" else backend_kernels(path.split("-")[1])


def _meta(q_lens, ctx_lens, tables, groups, kernels):
    group, slots = build_group(0, q_lens, ctx_lens, tables, BLOCK, groups, padded=False)
    return AttentionMetadata(slots, [group], ops_for(kernels))


# requests: past a 16-row tile and past 64 rows (AMX, up to 128); q4: 8-row passes (1-8) and
# the panel product (9 and more: up to 16, or 128 on WIDE_Q4)
@pytest.mark.parametrize(
    "path,requests",
    [("amx", n) for n in (1, 19, 100)]
    + [(p, n) for p in PATHS[1:] for n in (1, 7, 16)]
    + [(p, n) for p in WIDE_Q4 for n in (25, 70)],
)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_decode_gives_the_layer_by_layer_bits(
    tmp_path: Path, path: str, name: str, requests: int
):
    kernels = _kernels(path)
    model, arch = _load(tmp_path, name, path)
    fused = model.fused_decode
    assert fused is not None
    hidden, caches = _fused_and_layer_by_layer(model, arch, kernels, requests)
    assert torch.equal(hidden["fused"], hidden["layers"])
    for a, b in zip(caches["fused"], caches["layers"], strict=True):
        assert torch.equal(a, b)


def _fused_and_layer_by_layer(model, arch, kernels, requests, kv_dtype=None):
    """Random prompts (layer by layer), then 3 decode steps, fused and layer by layer: each
    way's final hidden states [3, requests, hidden] and its KV caches (of kv_dtype, else the
    weights' dtype)."""
    fused = model.fused_decode
    gen = torch.Generator().manual_seed(requests)
    lens = torch.randint(1, 40, (requests,), generator=gen).tolist()
    width = 48 // BLOCK
    tables = [list(range(b * width, (b + 1) * width)) for b in range(requests)]
    shape = (2, requests * width, BLOCK, arch.num_kv_heads, arch.head_dim)
    g = arch.num_heads // arch.num_kv_heads
    dtype = kv_dtype or model.dtype
    caches = {k: [torch.zeros(shape, dtype=dtype) for _ in range(arch.num_layers)]
              for k in ("fused", "layers")}  # fmt: skip
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=gen) for n in lens]
    hidden = {}
    with torch.inference_mode():
        for kind, kv in caches.items():
            model.fused_decode = fused if kind == "fused" else None
            meta = _meta(lens, lens, tables, g, kernels)  # the prompts (layer by layer)
            positions = torch.cat([torch.arange(n) for n in lens])
            model(torch.cat(prompts), positions, kv, meta)
            steps = []
            for step in range(3):  # decodes: fused where it is set
                ctx = [n + step + 1 for n in lens]
                meta = _meta([1] * requests, ctx, tables, g, kernels)
                assert fused.takes(meta, requests)
                ids = torch.randint(
                    0, arch.vocab_size, (requests,), generator=gen.manual_seed(step)
                )
                steps.append(model(ids, torch.tensor(ctx) - 1, kv, meta))
            hidden[kind] = torch.stack(steps)
    model.fused_decode = fused
    return hidden, caches


@pytest.mark.parametrize(
    "build,requests",
    [(b, n) for b in KERNEL_BUILDS for n in (1, 7, 16)]
    + [(b, 25) for b in KERNEL_BUILDS if b not in AVX512_BUILDS],
)
@pytest.mark.parametrize("mix", list(GGUF_MIXES))
def test_fused_decode_over_gguf_mixes(tmp_path: Path, mix: str, build: str, requests: int):
    """llama.cpp's mixes give layers of Q8Linears (Q6_K, the 5-bit types, Q8_0) and SplitLinears
    (Q4_K_M's Q4_K q/k with a Q6_K v) besides Q4Linears: the fused step takes them too (W_Q8F32,
    W_SPLIT), with the layer-by-layer bits, in few-row passes and the panel product."""
    types, default, tied, kinds = GGUF_MIXES[mix]
    path = write_tiny_llama(tmp_path / f"{mix}.gguf", types, tied=tied, default=default)
    arch, source = read_arch(path)
    cpu = select_backend(torch.device("cpu"), build)
    model = load_model(path, arch, source, torch.float32, cpu, 256).model
    found = {type(m).__name__ for m in model.modules() if reads_blocks(m)}
    assert found == set(kinds)
    most = 16 if build in AVX512_BUILDS else 128
    assert model.fused_decode is not None and model.fused_decode.max_rows == most
    hidden, caches = _fused_and_layer_by_layer(model, arch, cpu.kernels, requests)
    assert torch.equal(hidden["fused"], hidden["layers"])
    for a, b in zip(caches["fused"], caches["layers"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("requests", [1, 16])
@pytest.mark.parametrize(
    "kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str
)
@pytest.mark.parametrize("build", KERNEL_BUILDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_decode_over_smaller_caches(
    tmp_path: Path, name: str, build: str, kv_dtype, requests: int
):
    """`--kv-cache-dtype` bfloat16 or fp8 under float32 weights: the fused step writes and reads
    the cache as the layer-by-layer path does, to the bit (fp8 with each layer's own scales)."""
    model, arch = _load(tmp_path, name, f"q4-{build}-float32")
    if kv_dtype.itemsize == 1:
        for i, attn in enumerate(model.attention):
            attn.kv_scales = (0.02 * (i + 1), 0.01 * (i + 2))
    hidden, caches = _fused_and_layer_by_layer(model, arch, _kernels(f"q4-{build}"), requests,
                                               kv_dtype)  # fmt: skip
    assert torch.equal(hidden["fused"], hidden["layers"])
    for a, b in zip(caches["fused"], caches["layers"], strict=True):
        assert a.dtype == kv_dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_four_bit_weights_give_the_bf16_bits() -> None:
    """The bundled GGUF's Q4_1 linears, kept 4-bit (AmxLinear.four_bit), give the hidden states
    and caches of the same model with bf16 tiles (read_blocks=False) to the bit, fused and layer
    by layer."""
    kernels = amx_kernels()
    path = bundled_model_path()
    arch, source = read_arch(path)
    cpu = select_backend(torch.device("cpu"), "amx")
    four = load_model(path, arch, source, torch.bfloat16, cpu, 256).model
    plain = load_model(path, arch, source, torch.bfloat16, cpu, 256, read_blocks=False).model
    amx = [[m for m in model.modules() if isinstance(m, AmxLinear)] for model in (four, plain)]
    assert sum(m.four_bit for m in amx[0]) == 4 * arch.num_layers  # all but the LM head (Q8_0)
    assert not any(m.four_bit for m in amx[1])
    hidden, caches = _fused_and_layer_by_layer(four, arch, kernels, 19)
    want, want_caches = _fused_and_layer_by_layer(plain, arch, kernels, 19)
    for kind in ("fused", "layers"):
        assert torch.equal(hidden[kind], want[kind])
        assert all(torch.equal(a, b) for a, b in zip(caches[kind], want_caches[kind], strict=True))
    assert torch.equal(hidden["fused"], hidden["layers"])


@pytest.mark.parametrize("path", PATHS)
def test_fused_decode_skips_prompts_and_large_batches(tmp_path: Path, path: str) -> None:
    kernels = _kernels(path)
    model, arch = _load(tmp_path, "qwen2-d16", path)
    fused = model.fused_decode
    assert fused is not None
    g = arch.num_heads // arch.num_kv_heads
    assert not fused.takes(_meta([3], [3], [[0]], g, kernels), 3)  # a prompt chunk
    many = fused.max_rows + 1  # more rows than the linears' kernels take
    assert fused.max_rows == (128 if path == "amx" or path in WIDE_Q4 else 16)
    assert not fused.takes(_meta([1] * many, [1] * many, [[0]] * many, g, kernels), many)
    assert not fused.takes(_meta([1], [1], [[0]], g, None), 1)  # no kernels in the metadata
