"""The compiled CPU decode-attention kernel against plain torch math, and a step's attention
(write_kv, then ops.attend) with and without it."""

from __future__ import annotations

import ctypes
import glob
import math
import os
import subprocess
import sys

import pytest
import torch

from headrace.model.attention import AttentionMetadata, build_group, write_kv
from headrace.model.backend import backend_kernels, runnable, select_backend
from headrace.model.kernels import API, openmp_runtimes, read_api
from headrace.model.layers import RMSNorm, RotaryEmbedding
from headrace.model.ops import TORCH_OPS, KernelOps, ops_for
from tests.backends import KERNEL_BUILDS, amx_kernels

BLOCK = 16
# every cache dtype the kernels read: float32, bf16 and fp8 (E4M3, E5M2)
KV_DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.fixture(scope="module", params=KERNEL_BUILDS)
def kernels(request):
    """Each kernel build this CPU runs (amx, avx512, avx2, c): every vector path and its twin."""
    return backend_kernels(request.param)


@pytest.fixture(scope="module")
def amx():
    """The AMX build: its tile kernels (skipped where the CPU has none)."""
    return amx_kernels()


def test_a_kernel_build_runs_here():
    assert KERNEL_BUILDS, "no kernel build ran here (is a C compiler installed?)"
    assert "c" in KERNEL_BUILDS  # the plain-C twins build on any CPU


def _random_case(
    dtype: torch.dtype,
    lens: list[int],
    heads: int = 9,
    kv_heads: int = 3,
    d: int = 64,
    block: int = BLOCK,
):
    gen = torch.Generator().manual_seed(len(lens))
    widths = [-(-n // block) for n in lens]
    num_blocks = sum(widths) + 5
    cache = torch.randn(2, num_blocks, block, kv_heads, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered in the cache
    tables, at = [], 0
    for w in widths:
        tables.append(perm[at : at + w])
        at += w
    q = torch.randn(len(lens), heads, d, generator=gen)
    return q, cache, tables


def _reference(q, cache, tables, lens, scale):
    out = []
    kv_heads = cache.shape[3]
    g = q.shape[1] // kv_heads
    for b, (table, n) in enumerate(zip(tables, lens, strict=True)):
        k = cache[0, table].reshape(-1, kv_heads, q.shape[2])[:n].float()
        v = cache[1, table].reshape(-1, kv_heads, q.shape[2])[:n].float()
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # [n, H, D]
        s = torch.einsum("hd,nhd->hn", q[b], k) * scale
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,d",
    # head_dim 64 with 1-4 query heads per KV head takes the register-tiled path (GQA 3 is
    # SmolLM2); 8 per KV head and head_dim 128 take the generic loop
    [(9, 3, 64), (4, 4, 64), (8, 4, 64), (8, 2, 64), (8, 1, 64), (4, 2, 128)],
)
def test_kernel_matches_torch(kernels, dtype, heads, kv_heads, d):
    lens = [1, 15, 16, 17, 100, 333, 64, 2]  # partial and full blocks, a single token
    q, cache, tables = _random_case(dtype, lens, heads, kv_heads, d)
    width = max(len(t) for t in tables)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    for b, t in enumerate(tables):
        table[b, : len(t)] = torch.tensor(t)
    scale = 1 / math.sqrt(q.shape[2])
    got = kernels.paged_decode_attention(q, cache, table, torch.tensor(lens), scale)
    want = _reference(q, cache, tables, lens, scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("block", [8, 32])
def test_kernel_matches_torch_at_other_block_sizes(kernels, dtype, block):
    """The one-pass path walks chunks of at most 16 positions inside a block: smaller blocks end
    chunks early, larger ones hold several."""
    lens = [1, 7, 8, 9, 31, 32, 33, 100, 333]
    q, cache, tables = _random_case(dtype, lens, block=block)
    table = torch.zeros(len(lens), max(len(t) for t in tables), dtype=torch.long)
    for b, t in enumerate(tables):
        table[b, : len(t)] = torch.tensor(t)
    got = kernels.paged_decode_attention(q, cache, table, torch.tensor(lens), 0.125)
    want = _reference(q, cache, tables, lens, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _causal_reference(q, cache, tables, q_lens, ctx_lens, scale):
    """Request by request: its queries are the last q_lens of its ctx_lens positions."""
    kv_heads, d = cache.shape[3], cache.shape[4]
    g = q.shape[1] // kv_heads
    outs, start = [], 0
    for table, q_len, ctx in zip(tables, q_lens, ctx_lens, strict=True):
        k = cache[0, table].reshape(-1, kv_heads, d)[:ctx].float().repeat_interleave(g, 1)
        v = cache[1, table].reshape(-1, kv_heads, d)[:ctx].float().repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", q[start : start + q_len], k) * scale
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        s = s.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        start += q_len
    return torch.cat(outs)


# SmolLM2's shape; MHA with head_dim 128 and blocks smaller than a key chunk; GQA 8 with blocks
# of two chunks; Qwen2-0.5B's 7 query heads per KV head; head_dim 80 (not a multiple of 16, nor
# of 32: no AMX kernel)
PREFILL_SHAPES = [(9, 3, 64, 16), (4, 4, 128, 8), (8, 1, 64, 32), (14, 2, 64, 16), (6, 3, 80, 16)]


# the float32-FMA kernel for every cache dtype (every build)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d,block", PREFILL_SHAPES)
def test_prefill_kernel_matches_torch(kernels, dtype, heads, kv_heads, d, block):
    _check_prefill(kernels, False, dtype, heads, kv_heads, d, block)


# the AMX one for a bf16 cache, under the same tolerance (its Q and softmax weights go in as
# hi + lo bf16 pairs)
@pytest.mark.parametrize("heads,kv_heads,d,block", [s for s in PREFILL_SHAPES if s[2] % 32 == 0])
def test_amx_prefill_kernel_matches_torch(amx, heads, kv_heads, d, block):
    _check_prefill(amx, True, torch.bfloat16, heads, kv_heads, d, block)


def _check_prefill(kernels, amx, dtype, heads, kv_heads, d, block):
    # whole prompts, chunks after a cached prefix (ctx > q), one token, tile and block edges
    q_lens = [1, 5, 16, 17, 40, 128, 3, 33]
    ctx_lens = [1, 20, 16, 50, 40, 300, 3, 33]
    gen = torch.Generator().manual_seed(d + block)
    widths = [-(-n // block) for n in ctx_lens]
    num_blocks = sum(widths) + 3
    cache = torch.randn(2, num_blocks, block, kv_heads, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    # past a request's blocks the table holds no block: a kernel that reads one crashes
    table = torch.full((len(q_lens), max(widths)), 1 << 40, dtype=torch.long)
    for b, w in enumerate(widths):
        tables.append(perm[at : at + w])
        table[b, :w] = torch.tensor(tables[-1])
        at += w
    q = torch.randn(sum(q_lens), heads, d, generator=gen)
    scale = 1 / math.sqrt(d)
    got = kernels.paged_prefill_attention(
        q, cache, table, torch.tensor(q_lens), torch.tensor(ctx_lens), scale, amx=amx
    )
    want = _causal_reference(q, cache, tables, q_lens, ctx_lens, scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_amx_attention_follows_the_build(kernels):
    assert kernels.prefill_on_amx(torch.bfloat16, 64) == kernels.amx
    assert not kernels.prefill_on_amx(torch.float32, 64)  # the tiles take a bf16 cache only
    assert not kernels.prefill_on_amx(torch.bfloat16, 80)


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_paged_attention_same_with_and_without_kernel(kernels, dtype):
    """A step with decodes and a prefill chunk: the torch path, and the kernels (one per group);
    an fp8 cache with scales (K / k_scale and V / v_scale stored)."""
    kv_scales = (0.03, 0.5) if dtype.itemsize == 1 else (1.0, 1.0)
    lens = [5, 40, 18, 77]
    q_lens = [1, 1, 1, 9]
    q_all, cache, tables = _random_case(dtype, lens)
    heads, d = q_all.shape[1], q_all.shape[2]
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sum(q_lens), heads, d, generator=gen)
    k = torch.randn(sum(q_lens), cache.shape[3], d, generator=gen)
    v = torch.randn_like(k)
    outs = []
    for kern in (None, kernels):  # the kernels need no padded layout
        dec, dec_slots = build_group(0, q_lens[:3], lens[:3], tables[:3], BLOCK, 3, kern is None)
        pre, pre_slots = build_group(3, q_lens[3:], lens[3:], tables[3:], BLOCK, 3, kern is None)
        assert dec.q_lens is None and pre.q_lens is not None  # a decode kernel, a prefill kernel
        meta = AttentionMetadata(torch.cat([dec_slots, pre_slots]), [dec, pre], ops_for(kern))
        step_cache = cache.clone()
        write_kv(step_cache, meta.slot_mapping, k, v, kv_scales)
        outs.append(meta.ops.attend(q, step_cache, meta, 0.125, kv_scales))
    assert outs[0].dtype == outs[1].dtype == torch.float32  # attention computes in float32
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block", [16, 32])
def test_decode_group_without_padding_lays_out_the_same(block):
    """build_group's decode layout for the kernels against the padded one: the same block
    table, lengths and slots, each new token's slot at its last position."""
    lens = [1, 16, 17, 33, 64, 200]
    _, _, tables = _random_case(torch.float32, lens, block=block)
    padded, padded_slots = build_group(2, [1] * len(lens), lens, tables, block, 3, True)
    plain, plain_slots = build_group(2, [1] * len(lens), lens, tables, block, 3, False)
    assert plain.tokens == padded.tokens == slice(2, 2 + len(lens))
    assert plain.q_lens is None and not plain.padded
    assert torch.equal(plain.blocks, padded.blocks) and torch.equal(plain.ctx_lens, padded.ctx_lens)
    assert plain_slots.dtype == padded_slots.dtype == torch.int64
    assert plain_slots.tolist() == padded_slots.tolist()
    assert plain_slots.tolist() == [
        t[(n - 1) // block] * block + (n - 1) % block for t, n in zip(tables, lens, strict=True)
    ]


def test_dtype_float16_off_cpu_only(caplog):
    """`--dtype half` from a GPU manifest: float16 where the torch backend runs off CPU (a meta
    device stands in for CUDA here); on CPU, auto's choice, with a warning."""
    off_cpu = select_backend(torch.device("meta"))
    assert off_cpu.name == "torch" and off_cpu.dtype("float16") == torch.float16
    assert off_cpu.kv_cache_dtype(torch.float16) == torch.float16
    cpu = select_backend(torch.device("cpu"))
    assert cpu.dtype("float16") == cpu.dtype("auto")
    assert "do not compute in float16" in caplog.text


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("HEADRACE_CACHE_DIR", str(tmp_path))
    backend_kernels.cache_clear()
    try:
        backend = select_backend(torch.device("cpu"), "auto")
        assert backend.name == "torch" and backend.kernels is None
        assert "using torch ops alone" in caplog.text
        with pytest.raises(ValueError, match="HEADRACE_CPU_BACKEND=c: its kernels did not build"):
            select_backend(torch.device("cpu"), "c")  # asked for: an error, not a fallback
    finally:
        backend_kernels.cache_clear()


_MATMUL_UNDER_CAPS = """
import torch
from headrace import envs
print("caps", envs.cap_libraries_for_cpu_backend(), flush=True)
x, w = torch.randn(64, 576), torch.randn(1536, 576)
torch.nn.functional.linear(x.bfloat16(), w.bfloat16())
torch.nn.functional.linear(x, w)
"""


@pytest.mark.parametrize("backend", ["avx512", "avx2"])
def test_forced_backend_keeps_torchs_libraries_off_what_it_turns_off(backend):
    """HEADRACE_CPU_BACKEND=avx512 runs what a CPU without AMX runs, matmuls by oneDNN and MKL
    included (on an AMX CPU oneDNN's bf16 matmul would take the tiles); avx2, what an AVX2 CPU
    runs. Read from the libraries' own verbose lines, in a fresh process (they read their caps
    once)."""
    if runnable(backend) is not None:
        pytest.skip(f"{backend}: {runnable(backend)}")
    caps = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    env = {k: v for k, v in os.environ.items() if k not in caps}
    env.update(HEADRACE_CPU_BACKEND=backend, ONEDNN_VERBOSE="1", MKL_VERBOSE="1")
    out = subprocess.run(
        [sys.executable, "-c", _MATMUL_UNDER_CAPS], env=env, capture_output=True, text=True,
        check=True, timeout=120,
    ).stdout  # fmt: skip
    onednn = [line for line in out.splitlines() if ",primitive,exec," in line]
    mkl = [line for line in out.splitlines() if line.startswith("MKL_VERBOSE oneMKL")]
    assert not any("amx" in line for line in onednn), onednn
    if backend == "avx512":  # the bf16 matmul is oneDNN's, off the tiles
        assert "'ONEDNN_MAX_CPU_ISA': 'AVX512_CORE_BF16'" in out
        assert any("matmul" in line for line in onednn), out
    else:  # oneDNN has no bf16 matmul below AVX-512 (torch's own runs it); MKL the float32 one
        assert not any("avx512" in line for line in onednn), onednn
        assert mkl and all("AVX-512" not in line for line in mkl), mkl


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [3, 200])  # one thread, and enough work for the parallel path
def test_add_rms_norm_matches_torch(kernels, x_dtype, out_dtype, with_residual, rows):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=gen) * 3).to(x_dtype)
    residual = torch.randn(rows, 576, generator=gen) if with_residual else None
    weight = torch.rand(576, generator=gen) + 0.5
    norm = RMSNorm(576, 1e-5)
    norm.weight.copy_(weight)
    want, want_res = norm(x, residual, out_dtype, TORCH_OPS)
    got, got_res = norm(x, residual, out_dtype, KernelOps(kernels))
    assert got.dtype == out_dtype and got_res.dtype == torch.float32
    torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)
    if out_dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # one bf16 rounding step apart at most
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_rope_write_kv_matches_torch(kernels, qkv_dtype, kv_dtype):
    heads, kv_heads, d, tokens = 9, 3, 64, 40
    gen = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(d, 512, 10000.0, None)
    rope.build(torch.device("cpu"))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen).to(qkv_dtype)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    slots = torch.randperm(8 * BLOCK, generator=gen)[:tokens]
    want_cache = torch.zeros(2, 8, BLOCK, kv_heads, d, dtype=kv_dtype)
    got_cache = want_cache.clone()

    q, k, v = qkv.float().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    want_q, k = rope(positions, q.view(tokens, heads, d), k.view(tokens, kv_heads, d))
    write_kv(want_cache, slots, k, v.reshape(tokens, kv_heads, d))

    got_q = kernels.rope_write_kv(qkv, positions, rope.cos, rope.sin, slots, got_cache, heads)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    if kv_dtype == torch.float32:
        torch.testing.assert_close(got_cache, want_cache, atol=1e-5, rtol=1e-5)
        return
    # V is stored as it came: rounded the same way, bit for bit
    assert torch.equal(got_cache[1].view(torch.uint8), want_cache[1].view(torch.uint8))
    # rotated K: the same float32 value, rounded once, where the products' order may move it by
    # an ulp across a rounding boundary: one step of the cache's dtype at most
    step = torch.finfo(kv_dtype).eps  # 2^-mantissa bits
    torch.testing.assert_close(
        got_cache[0].float(), want_cache[0].float(), atol=1e-2, rtol=1.01 * step
    )


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_holds_torchs_bits_and_reads_them_exactly(kernels, kv_dtype):
    """The kernels' fp8 store against torch's conversion (write_kv's clamp, then the cast) on
    values at every edge: halfway between codes (to even), subnormals, the largest finite value
    and past it (saturation), zeros of both signs, NaN; and every code but NaN read back
    exactly (a one-position decode attention returns its V row as it reads it)."""
    heads, kv_heads, d = 3, 3, 64
    info = torch.finfo(kv_dtype)
    codes = torch.arange(256, dtype=torch.uint8).view(kv_dtype).float()
    finite = codes[codes.isfinite()].unique()
    mids = (finite[:-1] + finite[1:]) / 2  # exact halfway points: round to even
    specials = torch.tensor([0.0, -0.0, info.max, -info.max, 2 * info.max, -1e30, float("inf")])
    specials = torch.cat([specials, torch.tensor([float("nan"), info.tiny, info.tiny / 3])])
    gen = torch.Generator().manual_seed(5)
    scales = 10.0 ** torch.randint(-8, 6, (2048,), generator=gen)
    values = torch.cat([finite, mids, specials, torch.randn(2048, generator=gen) * scales])
    tokens = -(-values.numel() // (kv_heads * d))
    v = torch.zeros(tokens * kv_heads * d)
    v[: values.numel()] = values
    v = v.view(tokens, kv_heads, d)
    qkv = torch.cat([torch.zeros(tokens, (heads + kv_heads) * d), v.view(tokens, -1)], 1)
    rope = RotaryEmbedding(d, 64, 10000.0, None)
    rope.build(torch.device("cpu"))
    slots = torch.arange(tokens)
    blocks = -(-tokens // BLOCK)
    want = torch.zeros(2, blocks, BLOCK, kv_heads, d, dtype=kv_dtype)
    got = want.clone()
    write_kv(want, slots, torch.zeros(tokens, kv_heads, d), v)
    kernels.rope_write_kv(qkv, torch.zeros(tokens, dtype=torch.long), rope.cos, rope.sin, slots,
                          got, heads)  # fmt: skip
    assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))

    # every non-NaN code as V of one-position requests: softmax weight 1, the row comes back
    readable = torch.arange(256, dtype=torch.uint8)
    readable = readable[~readable.view(kv_dtype).float().isnan()]
    rows = -(-readable.numel() // (kv_heads * d))
    cache = torch.zeros(2, rows, BLOCK, kv_heads, d, dtype=torch.uint8)
    flat = torch.zeros(rows * kv_heads * d, dtype=torch.uint8)
    flat[: readable.numel()] = readable
    cache[1, :, 0] = flat.view(rows, kv_heads, d)
    cache = cache.view(kv_dtype)
    q = torch.randn(rows, heads, d, generator=gen)
    table = torch.arange(rows).view(rows, 1)
    out = kernels.paged_decode_attention(q, cache, table, torch.ones(rows, dtype=torch.long), 0.1)
    assert torch.equal(out.view(-1), cache[1, :, 0].float().reshape(-1))


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("d", [64, 128])  # the one-pass decode path, and the generic loop
def test_fp8_scales_scale_what_is_stored_and_read(kernels, kv_dtype, d):
    """An fp8 cache holds K / k_scale and V / v_scale: rope_write_kv stores them as write_kv
    does (V bit for bit), and both attention kernels read them back times their scale."""
    heads, kv_heads, tokens = 8, 2, 40
    k_scale, v_scale = 0.0123, 0.00456  # small values kept in the normal range, as measured
    gen = torch.Generator().manual_seed(d)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen) * 0.5
    rope = RotaryEmbedding(d, 64, 10000.0, None)
    rope.build(torch.device("cpu"))
    positions = torch.arange(tokens)
    slots = torch.randperm(4 * BLOCK, generator=gen)[:tokens]
    want = torch.zeros(2, 4, BLOCK, kv_heads, d, dtype=kv_dtype)
    got = want.clone()
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = rope(positions, q.view(tokens, heads, d), k.view(tokens, kv_heads, d))
    write_kv(want, slots, k, v.reshape(tokens, kv_heads, d), (k_scale, v_scale))
    kernels.rope_write_kv(qkv, positions, rope.cos, rope.sin, slots, got, heads,
                          (k_scale, v_scale))  # fmt: skip
    assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
    assert (got[1].float().abs().max() * v_scale - v.abs().max()).abs() < 0.1 * v.abs().max()

    # the reference reads the stored values times their scales
    scaled = torch.stack([want[0].float() * k_scale, want[1].float() * v_scale])
    table = torch.arange(4).view(1, 4)  # one request over the 4 blocks, in order
    lens = [4 * BLOCK]
    qd = torch.randn(1, heads, d, generator=gen)
    dec = kernels.paged_decode_attention(qd, want, table, torch.tensor(lens), d**-0.5,
                                         (k_scale, v_scale))  # fmt: skip
    torch.testing.assert_close(dec, _reference(qd, scaled, [[0, 1, 2, 3]], lens, d**-0.5),
                               atol=2e-5, rtol=1e-4)  # fmt: skip
    qp = torch.randn(9, heads, d, generator=gen)
    pre = kernels.paged_prefill_attention(
        qp, want, table, torch.tensor([9]), torch.tensor(lens), d**-0.5, amx=False,
        kv_scales=(k_scale, v_scale),
    )  # fmt: skip
    want_pre = _causal_reference(qp, scaled, [[0, 1, 2, 3]], [9], lens, d**-0.5)
    torch.testing.assert_close(pre, want_pre, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 64])
@pytest.mark.parametrize("width", [1536, 1541])  # 1541: vectors of 16 or 8, then the tail
def test_silu_mul_matches_torch(kernels, dtype, rows, width):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * width, generator=gen) * 4).to(dtype)
    gate, up = x.split(width, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # torch's two bf16 roundings, reproduced; exp may differ in the last float32 bit
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 7, 512, 513, 49152])  # block edges of the kernel's search
def test_argmax_matches_torch(kernels, dtype, cols):
    gen = torch.Generator().manual_seed(cols)
    x = torch.randint(-4, 4, (64, cols), generator=gen).to(dtype)  # many ties: the first wins
    x[1] = float("-inf")  # all -inf: index 0
    x[2, cols // 2 :] = float("inf")
    x[3, -1] = float("nan")  # a NaN wins over everything, the first NaN over later ones
    x[4, cols // 3] = x[4, -1] = float("nan")
    x[5, -1] = 100.0  # the maximum in the last (partial) block
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
    assert torch.equal(kernels.argmax(x[:1]), x[:1].argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("cols", "k"), [(1, 1), (300, 0), (300, 5), (49152, 1), (49152, 20)])
def test_logprobs_match_torch(kernels, dtype, cols, k):
    """Prompt logprobs' one call: the token's logprob, its rank and the top k, as torch's
    log_softmax, compare and topk give them (TorchOps.logprobs, the CUDA path)."""
    gen = torch.Generator().manual_seed(cols + k)
    x = (torch.randn(37, cols, generator=gen) * 4).to(dtype)
    x[3, cols // 2] = 40.0  # one token far above the rest
    targets = torch.randint(0, cols, (37,), generator=gen)
    targets[3] = cols // 2
    got = kernels.logprobs(x, targets, k)
    want = TORCH_OPS.logprobs(x, targets, k)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    assert torch.equal(got[1], want[1])  # ranks: 1 for row 3
    torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5)
    if dtype == torch.float32:  # bf16 logits tie often: there only the values must agree
        assert torch.equal(got[3], want[3])
    torch.testing.assert_close(
        x.float().gather(1, got[3]), x.float().gather(1, want[3]), atol=0, rtol=0
    )


def test_kernels_share_torchs_openmp_runtime():
    """The kernels' libgomp.so.1 resolves to the runtime torch loaded: one thread pool, even
    when another copy of an OpenMP runtime is mapped too (wheels such as sentencepiece bundle
    their own); here the system's libgomp, loaded by path, plays that part."""
    found = glob.glob("/usr/lib/*/libgomp.so.1") + glob.glob("/usr/lib64/libgomp.so.1")
    others = [ctypes.CDLL(p) for p in found]
    ours, torchs = openmp_runtimes(backend_kernels(KERNEL_BUILDS[0]).lib)
    assert ours is not None and ours == torchs
    assert all(openmp_runtimes(o)[0] != torchs for o in others)  # the lookup tells them apart


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 32, 33, 48, 49, 64, 65, 150])  # tile edges
@pytest.mark.parametrize(("n", "k", "bias"), [(48, 64, True), (160, 96, False), (960, 576, True)])
def test_amx_linear_matches_float32_math(amx, rows, n, k, bias):
    """Against the same bf16 operands multiplied in float32: only the output's bf16 rounding
    (and float32 summation order) may differ. Rows cover 1-4 A tiles, partial tiles and more
    than one 64-row slice; n = 48 gives the threads unequal shares of column blocks."""
    assert amx.amx_fits(n, k)
    gen = torch.Generator().manual_seed(rows * n)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    want = x.float() @ w.float().T + (b if b is not None else 0.0)
    got = amx.amx_linear(x, amx.amx_pack(w), b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=8e-3)
    exact = amx.amx_linear(x, amx.amx_pack(w), b, torch.float32)  # no bf16 rounding
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, want, atol=1e-4, rtol=1e-5)


def test_amx_pack_order(kernels):
    """Tile (j, c) row r holds, for each of the 16 columns 16j + i, the K elements 32c + 2r and
    32c + 2r + 1."""
    w = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64).to(torch.bfloat16)
    p = kernels.amx_pack(w)
    assert p.shape == (2, 2, 16, 16, 2)
    for j, c, r, i, e in [(0, 0, 0, 0, 0), (1, 1, 15, 15, 1), (1, 0, 3, 7, 1), (0, 1, 9, 2, 0)]:
        assert p[j, c, r, i, e] == w[16 * j + i, 32 * c + 2 * r + e]


@pytest.mark.parametrize("rows", [1, 17, 64, 100])
def test_amx_linear_argmax_matches_the_logits_argmax(amx, rows):
    """The LM head's fused argmax equals torch's argmax over amx_linear's float32 rows: ties to
    the lower index (within a thread's lanes and across the threads' column ranges), a NaN as
    the maximum (the first one), an all -inf row to index 0."""
    assert amx.amx_fits(4096, 64)
    gen = torch.Generator().manual_seed(rows)
    n, k = 4096, 64
    w = torch.randn(n, k, generator=gen)
    w[3000] = w[70] * 8  # equal columns, both the maximum for most rows: 70 must win
    w[4000] = w[70] * 8
    w[90] = w[2100] = w[2101] = 0.0  # equal zero sums; the NaNs below go to these columns
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    wb = w.to(torch.bfloat16)
    if rows > 2:
        x[1] = 0.0  # every logit 0: index 0
        x[2, 0] = float("inf")  # inf * w[:, 0]: +inf and -inf, NaN where w is 0 (column 90)
    packed = amx.amx_pack(wb)
    logits = amx.amx_linear(x, packed, None, torch.float32)
    want = logits.argmax(dim=-1)
    assert torch.equal(amx.amx_linear_argmax(x, packed), want)
    if rows > 2:
        assert want[1] == 0 and want[2] == 90
    # a NaN in the weights: that column's NaN sums win in every row; the first NaN column of two
    nan_w = wb.clone()
    nan_w[2101, 5] = nan_w[2100, 7] = float("nan")
    nan_packed = amx.amx_pack(nan_w)
    want = amx.amx_linear(x, nan_packed, None, torch.float32).argmax(dim=-1)
    assert torch.equal(amx.amx_linear_argmax(x, nan_packed), want)
    expect = torch.full_like(want, 2100)
    if rows > 2:
        expect[2] = 90  # that row's NaN at column 90 comes first
    assert torch.equal(want, expect)


def _q4_weight(gen, n, k, q4_0):
    """Random 4-bit blocks (scale, offset, q) as GGUF's Q4_0 (offset -8 scale) or Q4_1 holds
    them, and the float32 weight they stand for (dequantize's arithmetic)."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.05).half().float()
    scale[0, 0] = 0.0  # an all-zero block
    offset = -torch.rand(n, k // 32, generator=gen) * 0.4
    offset = -8.0 * scale if q4_0 else offset.half().float()
    w = q.float().reshape(n, k // 32, 32) * scale[..., None] + offset[..., None]
    return scale, offset, q, w.reshape(n, k)


@pytest.mark.parametrize("rows", [1, 17, 64, 100])  # partial tiles, 4 A tiles, two 64-row slices
@pytest.mark.parametrize(("n", "k", "bias"), [(48, 64, True), (960, 576, False)])
@pytest.mark.parametrize("q4_0", [False, True])
def test_amx_linear_four_bit_gives_the_bf16_bits(amx, rows, n, k, bias, q4_0):
    """A weight kept as 4-bit blocks (amx_pack_q4) gives exactly the outputs of its bf16
    rounding packed as bf16 tiles (amx_pack): the kernel makes the same bf16 values."""
    assert amx.amx_fits(n, k)
    gen = torch.Generator().manual_seed(rows * n + q4_0)
    scale, offset, q, w = _q4_weight(gen, n, k, q4_0)
    four = amx.amx_pack_q4(scale, offset, q)
    assert four is not None and four.shape == (n // 16, k // 32, 320)
    plain = amx.amx_pack(w)  # rounds to bf16 as the model's weights are
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    for out_dtype in (torch.bfloat16, torch.float32):
        want = amx.amx_linear(x, plain, b, out_dtype)
        assert torch.equal(amx.amx_linear(x, four, b, out_dtype), want)
    assert torch.equal(amx.amx_linear_argmax(x, four), amx.amx_linear_argmax(x, plain))


def test_amx_pack_q4_order_and_refusal(kernels):
    """Tile (j, c): the 16 columns' scales, then offsets (float16), then row r's byte i holding
    column i // 2's element 32c + 2r + i % 2 (low nibble) and column 8 + i // 2's (high). A
    scale float16 cannot hold is refused (None): the kernel reads float16."""
    gen = torch.Generator().manual_seed(0)
    scale, offset, q, _ = _q4_weight(gen, 32, 64, q4_0=False)
    p = kernels.amx_pack_q4(scale, offset, q)
    assert p is not None
    for j, c, r, i in [(0, 0, 0, 0), (1, 1, 15, 15), (1, 0, 3, 6), (0, 1, 9, 11)]:
        tile = p[j, c]
        assert tile[:32].view(torch.float16)[i].item() == scale[16 * j + i, c].item()
        assert tile[32:64].view(torch.float16)[i].item() == offset[16 * j + i, c].item()
        byte = int(tile[64 + 16 * r + i])
        k = 32 * c + 2 * r + i % 2
        assert byte & 0xF == q[16 * j + i // 2, k] and byte >> 4 == q[16 * j + 8 + i // 2, k]
    scale[3, 1] = 1.0 + 2.0**-20  # not a float16 value
    assert kernels.amx_pack_q4(scale, offset, q) is None


def test_api_header_binds_what_it_declares():
    """kernels/api.py types every call from api.h: pointers as addresses, the scalar types by
    name, structs field by field; a type it does not know is an error, not a guess."""
    api = read_api(
        """/* a comment */
        #define W_X 7 /* trailing */
        typedef struct { const float *a, *b; int n, m; } pair;
        HR_API int64_t f(const decode_layer *layers, int64_t L, float eps, int k);
        HR_API int g(void);"""
    )
    assert api.constants == {"W_X": 7}
    assert api.structs["pair"] == [
        ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("n", ctypes.c_int), ("m", ctypes.c_int)
    ]  # fmt: skip
    assert api.functions["f"] == (
        ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    )  # fmt: skip
    assert api.functions["g"] == (ctypes.c_int, [])
    with pytest.raises(ValueError, match="no ctypes type for 'double x'"):
        read_api("HR_API void h(double x);")
    built = backend_kernels(KERNEL_BUILDS[0])
    assert set(vars(built.c)) == set(API.functions)  # every declared function is exported
