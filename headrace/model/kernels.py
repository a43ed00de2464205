"""CPU kernels in C (model/csrc), compiled on first use with the host's C compiler and loaded
with ctypes.

Why C and not a torch extension: the files need no torch headers, so they build in about a
second instead of a minute, and the shared object is cached (HEADRACE_CACHE_DIR/kernels, keyed
by sources, compiler, flags and CPU), so later starts only load it. It is compiled for this CPU
(`-march=native`, less what the compute backend turns off: model/backend.py) and links
`libgomp.so.1`, which resolves to the OpenMP runtime torch has already loaded: the kernels run
on torch's thread pool, not a second one.

One source file per kernel family, each with its methods here:
- decode_attention.c, prefill_attention.c: attention read through the block table where K and V
  lie, instead of a gathered, padded and masked copy of the cache;
- elementwise.c: residual add + RMSNorm, RoPE + the cache write, SwiGLU's activation, greedy's
  argmax: runs of tiny torch ops that at decode sizes cost their thread wake-ups more than their
  arithmetic;
- amx_linear.c, amx_attention.c (tile primitives in amx.h): on CPUs with AMX-BF16, bf16 linears
  of up to 128 rows (layers.AmxLinear) at up to twice oneDNN's rate, reading GGUF 4-bit weights
  as stored (amx_pack_q4), and prompt-chunk attention over a bf16 cache on tiles;
- q4_linear.c: without AMX, float32 linears of up to 16 rows reading a GGUF's 4-bit blocks (and
  the LM head its 8-bit ones): AVX2 + FMA, or plain C (layers.Q4Linear, Q8Linear);
- decode_step.c: a decode step's decoder layers in one call over either kind of linear
  (model/fused.py).
api.h declares what Python calls; `bind` types every function from it (common.h holds what the
C files share among themselves).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any, NamedTuple

import torch

from headrace import envs

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.c")))  # one shared object; HEADERS are part of its key
HEADERS = tuple(sorted(CSRC.glob("*.h")))
FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden", "-shared",
    "-fPIC", "-std=gnu11",
)  # fmt: skip

_DTYPES = (torch.float32, torch.bfloat16)  # what every kernel reads and writes
API_HEADER = CSRC / "api.h"
_C_TYPES: dict[str, Any] = {
    "void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
}  # fmt: skip


class CApi(NamedTuple):
    """What csrc/api.h declares: functions (return type, argument types), structs (fields) and
    integer constants, as ctypes types."""

    functions: dict[str, tuple[Any, list[Any]]]
    structs: dict[str, list[tuple[str, Any]]]
    constants: dict[str, int]


def _c_decl(decl: str) -> tuple[str, Any]:
    """`const float *q` -> ("q", c_void_p); `int64_t B` -> ("B", c_int64). Any pointer is an
    address; a type this binding does not know is an error, not a guess."""
    m = re.fullmatch(r"(?:const )?(\w+) ?(\**) ?(\w+)", " ".join(decl.split()))
    if m is None or (not m[2] and m[1] not in _C_TYPES):
        raise ValueError(f"api.h: no ctypes type for {decl.strip()!r}")
    return m[3], ctypes.c_void_p if m[2] else _C_TYPES[m[1]]


def read_api(text: str) -> CApi:
    """Parse api.h's text (its plain subset of C: one-line #defines of integers, typedef'd
    structs of pointers and scalars, HR_API prototypes)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    constants = {m[1]: int(m[2]) for m in re.finditer(r"^\s*#define (\w+) (\d+)\s*$", text, re.M)}
    structs = {}
    for body, name in re.findall(r"typedef struct \{(.*?)\} (\w+);", text, re.S):
        fields = []
        for decl in filter(str.strip, body.split(";")):
            first, *more = decl.split(",")
            fields.append(_c_decl(first))
            base = first.strip().rsplit(" ", 1)[0].rstrip("*").strip()
            fields += [_c_decl(f"{base} {other}") for other in more]
        structs[name] = fields
    functions = {}
    for ret, name, params in re.findall(r"HR_API (\w+) (\w+)\((.*?)\);", text, re.S):
        args = [] if params.strip() == "void" else [_c_decl(p)[1] for p in params.split(",")]
        functions[name] = (_C_TYPES[ret], args)
    return CApi(functions, structs, constants)


API = read_api(API_HEADER.read_text())
# amx_linear's weight formats: what amx_pack and amx_pack_q4 return; and decode_layers'
# W_Q4F32, a Q4Packed weight (q4_linear's) behind a Q4Weight
W_BF16, W_Q4, W_Q4F32, Q4_TILE_BYTES = (
    API.constants[n] for n in ("W_BF16", "W_Q4", "W_Q4F32", "Q4_TILE_BYTES")
)


def weight_format(packed: torch.Tensor) -> int:
    """The format of an amx_pack (bf16) or amx_pack_q4 (uint8) result."""
    return W_Q4 if packed.dtype == torch.uint8 else W_BF16


class DecodeLayer(ctypes.Structure):
    """api.h's decode_layer: one decoder layer's norm weights, linears (biases or NULL) and K/V
    caches, as addresses, and the linears' formats."""

    _fields_ = API.structs["decode_layer"]


class Q4Weight(ctypes.Structure):
    """api.h's q4_weight: a Q4Packed weight's addresses, as decode_layers reads a W_Q4F32
    linear."""

    _fields_ = API.structs["q4_weight"]


def bind(lib: ctypes.CDLL) -> Any:
    """Every function api.h declares, typed, as attributes of one object."""
    fns = {}
    for name, (restype, argtypes) in API.functions.items():
        fn = lib[name]
        fn.restype, fn.argtypes = restype, argtypes
        fns[name] = fn
    return types.SimpleNamespace(**fns)


class Q4Packed(NamedTuple):
    """A weight for q4_linear: nibbles [N, K/32, 16] uint8, scale and offset [N, K/32]."""

    nibbles: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


class Kernels:
    """The typed functions of one build of the kernels, and the Python around each call."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.c = bind(lib)
        self.q4_vectorized = bool(self.c.q4_linear_vectorized())
        self.amx = bool(self.c.amx_available())

    # ---- decode_attention.c ----

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        ctx_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [B, H, D] float32; kv_cache [2, blocks, block_size, KH, D] float32 or bfloat16;
        block_table [B, W] and ctx_lens [B] int64 (1 <= ctx_lens <= W * block_size).
        Returns [B, H, D] float32."""
        b, h, d = q.shape
        _, _, block_size, kh, _ = kv_cache.shape
        q = q.contiguous()
        assert q.dtype == torch.float32 and kv_cache.is_contiguous()
        assert kv_cache.dtype in _DTYPES
        assert block_table.dtype == ctx_lens.dtype == torch.int64
        assert block_table.is_contiguous() and ctx_lens.is_contiguous()
        out = torch.empty_like(q)
        self.c.paged_decode_attention(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            block_table.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(),
            b, block_table.shape[1], h, kh, d, block_size, scale,
            int(kv_cache.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out

    # ---- prefill_attention.c, amx_attention.c ----

    @staticmethod
    def handles_prefill(head_dim: int) -> bool:
        """Whether paged_prefill_attention takes this head size (its loops go 8 dims at a
        time); elsewhere prompt chunks keep the torch path."""
        return head_dim % 8 == 0

    def prefill_on_amx(self, kv_dtype: torch.dtype, head_dim: int) -> bool:
        """Whether prompt chunks take paged_prefill_attention_amx: a bf16 cache (the tiles
        multiply bf16; Q and the softmax weights go in as hi + lo bf16 pairs, so results stay
        within ~1e-5 of the float32 kernel), AMX usable here, head_dim % 32 == 0."""
        return self.amx and kv_dtype == torch.bfloat16 and head_dim % 32 == 0

    def paged_prefill_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        q_lens: torch.Tensor,
        ctx_lens: torch.Tensor,
        scale: float,
        amx: bool | None = None,
    ) -> torch.Tensor:
        """Causal attention of several query tokens per request over the cache (their own K/V
        already in it). q [sum(q_lens), H, D] float32, request b's rows after request b-1's;
        its query i sits at position ctx_lens[b] - q_lens[b] + i. kv_cache as for decode;
        block_table [B, W], q_lens and ctx_lens [B] int64. Returns [sum(q_lens), H, D]
        float32. amx: None picks by prefill_on_amx; False forces the float32 kernel."""
        _, h, d = q.shape
        _, _, block_size, kh, _ = kv_cache.shape
        q = q.contiguous()
        assert q.dtype == torch.float32 and kv_cache.is_contiguous() and self.handles_prefill(d)
        assert kv_cache.dtype in _DTYPES
        assert block_table.dtype == q_lens.dtype == ctx_lens.dtype == torch.int64
        assert block_table.is_contiguous() and q_lens.is_contiguous() and ctx_lens.is_contiguous()
        if amx is None:
            amx = self.prefill_on_amx(kv_cache.dtype, d)
        assert not amx or self.prefill_on_amx(kv_cache.dtype, d)
        out = torch.empty_like(q)
        (self.c.paged_prefill_attention_amx if amx else self.c.paged_prefill_attention)(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            block_table.data_ptr(), q_lens.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(),
            block_table.shape[0], block_table.shape[1], h, kh, d, block_size, scale,
            int(kv_cache.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out

    # ---- elementwise.c ----

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual) * weight in out_dtype, x + residual in float32).
        x [T, N] float32 or bfloat16, residual [T, N] float32 or None, weight [N] float32,
        out_dtype float32 or bfloat16."""
        x = x.contiguous()
        t, n = x.shape
        assert x.dtype in _DTYPES and out_dtype in _DTYPES and weight.dtype == torch.float32
        assert residual is None or (residual.dtype == torch.float32 and residual.is_contiguous())
        res_out = torch.empty(t, n, dtype=torch.float32)
        out = torch.empty(t, n, dtype=out_dtype)
        self.c.add_rms_norm(
            x.data_ptr(), int(x.dtype == torch.bfloat16),
            None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
            res_out.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16), t, n,
            torch.get_num_threads(),
        )  # fmt: skip
        return out, res_out

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        """Rotate-half RoPE on the q and k parts of `qkv` [T, (H + 2 KH) * D] (float32 or
        bfloat16), rotated k and v written to `kv_cache` at `slot_mapping`; returns rotated q
        [T, H, D] float32. cos/sin: [max_positions, D] float32; positions, slots: [T] int64."""
        qkv = qkv.contiguous()
        _, _, _, kh, d = kv_cache.shape
        t = qkv.shape[0]
        assert qkv.shape[1] == (num_heads + 2 * kh) * d and qkv.dtype in _DTYPES
        assert kv_cache.dtype in _DTYPES and kv_cache.is_contiguous()
        assert cos.dtype == sin.dtype == torch.float32
        assert cos.is_contiguous() and sin.is_contiguous()
        assert positions.dtype == slot_mapping.dtype == torch.int64
        positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
        q = torch.empty(t, num_heads, d, dtype=torch.float32)
        self.c.rope_write_kv(
            qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), positions.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), q.data_ptr(),
            kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), int(kv_cache.dtype == torch.bfloat16),
            t, num_heads, kh, d, torch.get_num_threads(),
        )  # fmt: skip
        return q

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for x = [gate | up] [T, 2I] float32 or bfloat16 -> [T, I], x's dtype."""
        x = x.contiguous()
        t, two_i = x.shape
        assert x.dtype in _DTYPES and two_i % 2 == 0
        out = torch.empty(t, two_i // 2, dtype=x.dtype)
        self.c.silu_mul(
            x.data_ptr(), out.data_ptr(), int(x.dtype == torch.bfloat16), t, two_i // 2,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x.argmax(dim=-1) for [N, V] float32 or bfloat16 (first index of the maximum, a NaN
        counting as the maximum, as torch): one read of the logits, no upcast copy."""
        x = x.contiguous()
        rows, n = x.shape
        assert x.dtype in _DTYPES
        out = torch.empty(rows, dtype=torch.int64)
        self.c.argmax_rows(
            x.data_ptr(), int(x.dtype == torch.bfloat16), rows, n, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    # ---- amx_linear.c ----

    def amx_fits(self, out_features: int, in_features: int) -> bool:
        """Whether amx_linear runs here (AMX-BF16, tile registers granted) for this shape."""
        return self.amx and in_features % 32 == 0 and out_features % 16 == 0

    @staticmethod
    def amx_pack(weight: torch.Tensor) -> torch.Tensor:
        """A bf16 [N, K] weight in amx_linear's order: [N/16, K/32, 16, 16, 2], one 1 KB B tile
        per 16 output columns and 32-element K chunk (row r: each column's K elements 2r, 2r+1)."""
        n, k = weight.shape
        tiles = weight.detach().to(torch.bfloat16).reshape(n // 16, 16, k // 32, 16, 2)
        return tiles.permute(0, 2, 3, 1, 4).contiguous()

    @staticmethod
    def amx_pack_q4(
        scale: torch.Tensor, offset: torch.Tensor, q: torch.Tensor
    ) -> torch.Tensor | None:
        """A weight of 4-bit blocks, W[n, k] = scale[n, k // 32] * q[n, k] + offset[n, k // 32]
        (GGUF's Q4_0 and Q4_1), kept 4-bit in amx_linear's W_Q4 order: [N/16, K/32, 320] uint8,
        per tile the 16 columns' scales and offsets as float16, then 16 rows of 16 bytes (row r,
        byte j: column j // 2's element 2r + j % 2 in the low nibble, column 8 + j // 2's in the
        high one). The kernel makes each B tile from them as it goes, the same bf16 values as
        amx_pack(W) holds. scale, offset: [N, K/32] float32; q: [N, K] integers 0-15. None where
        a scale or offset is not a float16 value (the kernel keeps them as float16)."""
        n, k = q.shape
        halves = [x.to(torch.float16) for x in (scale, offset)]
        if not all(torch.equal(h.float(), x) for h, x in zip(halves, (scale, offset), strict=True)):
            return None
        # [N/16, 16 columns, K/32, 16 rows, 2] -> per tile [16 rows][16 columns][2] = 32 lanes
        lanes = q.to(torch.uint8).reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)
        lanes = lanes.reshape(n // 16, k // 32, 16, 32)
        nibbles = (lanes[..., :16] | (lanes[..., 16:] << 4)).reshape(n // 16, k // 32, 256)
        scales = [
            h.reshape(n // 16, 16, k // 32).transpose(1, 2).contiguous().view(torch.uint8)
            for h in halves
        ]
        return torch.cat([*scales, nibbles], dim=2).contiguous()

    def amx_linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """x [..., K] bf16 @ W^T (+ bias, float32) -> [..., N] in out_dtype (bf16 or float32:
        the float32 accumulator unrounded), W as amx_pack or amx_pack_q4 left it."""
        nb, kc = packed.shape[:2]
        n, k = nb * 16, kc * 32
        assert x.dtype == torch.bfloat16 and x.shape[-1] == k and out_dtype in _DTYPES
        assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        rows = x.reshape(-1, k).contiguous()
        out = torch.empty(rows.shape[0], n, dtype=out_dtype)
        self.c.amx_linear(
            rows.data_ptr(), packed.data_ptr(), weight_format(packed),
            None if bias is None else bias.data_ptr(), out.data_ptr(),
            int(out_dtype == torch.float32), rows.shape[0], n, k, torch.get_num_threads(),
        )  # fmt: skip
        return out.reshape(*x.shape[:-1], n)

    def amx_linear_argmax(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """amx_linear(x, packed, None, float32).argmax(-1), without the float32 rows: [M, K]
        bf16 -> [M] int64 (the first index of the maximum, a NaN counting as the maximum)."""
        nb, kc = packed.shape[:2]
        n, k = nb * 16, kc * 32
        assert x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] == k
        x = x.contiguous()
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self.c.amx_linear_argmax(
            x.data_ptr(), packed.data_ptr(), weight_format(packed), out.data_ptr(), x.shape[0],
            n, k,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    # ---- q4_linear.c ----

    @staticmethod
    def q4_pack(scale: torch.Tensor, offset: torch.Tensor, q: torch.Tensor) -> Q4Packed:
        """Q4Blocks (float32 scale/offset [N, K/32], uint8 q [N, K]) in q4_linear's layout:
        two weights a byte, as the GGUF file holds them."""
        n, k = q.shape
        blocks = q.reshape(n, k // 32, 2, 16)
        nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).contiguous()
        return Q4Packed(nibbles, scale.float().contiguous(), offset.float().contiguous())

    def q4_linear(self, x: torch.Tensor, w: Q4Packed, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] float32 @ W.T (+ bias) with W read from its 4-bit blocks; float32 [M, N]."""
        x = x.contiguous()
        m, k = x.shape
        n = w.nibbles.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        self.c.q4_linear(
            x.data_ptr(), w.nibbles.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k,
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    def q8_linear(
        self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, K] float32 @ W.T (+ bias), W = scale (per 32) * q, q int8 [N, K]: Q8_0."""
        x = x.contiguous()
        m, k = x.shape
        n = q.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        self.c.q8_linear(
            x.data_ptr(), q.data_ptr(), scale.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k,
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    # ---- decode_step.c ----

    def decode_layers_scratch(
        self,
        tokens: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        inter: int,
        f32: bool,
    ) -> int:
        """Bytes of scratch decode_layers needs for `tokens` tokens (f32: W_Q4F32 linears)."""
        return int(
            self.c.decode_layers_scratch(tokens, hidden, heads, kv_heads, head_dim, inter, int(f32))
        )

    def decode_layers(
        self,
        layers: ctypes.Array[DecodeLayer],
        embeds: torch.Tensor,
        final_norm: torch.Tensor,
        eps: float,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        block_table: torch.Tensor,
        ctx_lens: torch.Tensor,
        dims: tuple[int, int, int, int, int, int],
        scale: float,
        kv_bf16: bool,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """Every decoder layer of a decode step and the final norm in one call (csrc:
        decode_layers): embeds [T, hidden] (bf16 for AMX linears, float32 for W_Q4F32), token
        t being request t's new token at positions[t], written to slots[t]; block_table [T, W],
        ctx_lens [T] int64. dims:
        (hidden, heads, kv_heads, head_dim, intermediate, block_size). Returns [T, hidden]
        float32. The caller keeps `layers`' weights and caches, and `scratch` (at least
        decode_layers_scratch bytes), alive."""
        t = embeds.shape[0]
        hidden, heads, kv_heads, head_dim, inter, block_size = dims
        f32 = embeds.dtype == torch.float32
        assert embeds.dtype in _DTYPES and embeds.is_contiguous()
        assert positions.dtype == slots.dtype == block_table.dtype == ctx_lens.dtype == torch.int64
        assert block_table.is_contiguous() and ctx_lens.shape == (t,) and head_dim % 16 == 0
        assert scratch.numel() >= self.decode_layers_scratch(
            t, hidden, heads, kv_heads, head_dim, inter, f32
        )
        positions, slots = positions.contiguous(), slots.contiguous()
        out = torch.empty(t, hidden, dtype=torch.float32)
        self.c.decode_layers(
            ctypes.addressof(layers), len(layers), embeds.data_ptr(), final_norm.data_ptr(), eps,
            out.data_ptr(),
            positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
            block_table.data_ptr(), block_table.shape[1], ctx_lens.data_ptr(), t, hidden, heads,
            kv_heads, head_dim, inter, block_size, scale, int(kv_bf16), scratch.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out


def build_kernels(extra_flags: tuple[str, ...] = ()) -> Kernels:
    """Compile (or take from the cache) and load the kernels; `extra_flags` after -march=native,
    e.g. ("-mno-avx2", "-mno-fma") for the plain-C twins of the vector paths."""
    return Kernels(ctypes.CDLL(str(_build(extra_flags))))


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]  # fmt: skip


def openmp_runtimes(lib: ctypes.CDLL) -> tuple[str | None, str | None]:
    """The files of the OpenMP runtime `lib` calls into and of the one torch calls into (None
    where it cannot be told): `omp_get_max_threads` as each library's own lookup resolves it.
    Other libraries may bring runtimes of their own (sentencepiece does); only these two
    matter."""
    libtorch = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    torch_lib = ctypes.CDLL(str(libtorch)) if libtorch.exists() else None
    libc = ctypes.CDLL(None)

    def file_of(handle: ctypes.CDLL | None) -> str | None:
        if handle is None:
            return None
        try:
            fn = handle["omp_get_max_threads"]
        except AttributeError:
            return None
        info = _DlInfo()
        if not libc.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
        return os.path.realpath(info.dli_fname.decode())

    return file_of(lib), file_of(torch_lib)


def _build(extra_flags: tuple[str, ...] = ()) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = b"\0".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(
        b"\0".join([source, version.stdout.encode(), " ".join(flags).encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    target = envs.cache_dir() / "kernels" / key / "cpu_kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: engines starting together never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built the CPU kernels: %s", target)
    return target


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))
