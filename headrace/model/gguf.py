"""GGUF reading: metadata, dequantization, and the llama.cpp -> HF name and layout mapping."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from headrace.model.registry import ArchConfig, UnsupportedModelError

Q = GGMLQuantizationType
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# Bytes per block of the quantized types decoded here in torch: 32 weights a block, but the
# K-quants' and IQ4_XS's super-blocks of 256 (Q4_K, Q5_K, IQ4_XS: eight 32-weight blocks;
# Q2_K, Q3_K, Q6_K: sixteen of 16 weights, each with a small integer scale under float16 ones).
_BLOCK_BYTES = {
    Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q2_K: 84, Q.Q3_K: 110,
    Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210, Q.IQ4_NL: 18, Q.IQ4_XS: 136,
}  # fmt: skip
# llama.cpp's other i-quants (codebooks of 8-value grids), decoded by the gguf package's numpy
# code: slower at load, the same values. As int8 blocks (q8_blocks) too: (bytes a super-block of
# 256, weights a scale); see _grid_fields.
_GGUF_PY_TYPES = (
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
)  # fmt: skip
_GRID_TYPES = {
    Q.IQ2_XXS: (66, 32), Q.IQ2_XS: (74, 16), Q.IQ2_S: (82, 16), Q.IQ3_XXS: (98, 32),
    Q.IQ3_S: (110, 32), Q.IQ1_S: (50, 32), Q.IQ1_M: (56, 16),
}  # fmt: skip
# IQ4_NL's and IQ4_XS's 16 levels: a 4-bit code picks one of these, times the block's scale
_IQ4_LEVELS = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.int8
)
SUPPORTED_TYPES = tuple(t.name for t in (Q.F32, Q.F16, Q.BF16, *_BLOCK_BYTES, *_GGUF_PY_TYPES))


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Two uint8 columns -> float32 values of the little-endian float16 they hold."""
    return col.contiguous().view(torch.float16).float()


def split_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Bytes as their low nibbles, then their high ones, joined along `dim` (uint8 0-15): the
    order in which every 4-bit GGUF type lays out a run of weights."""
    return torch.cat([packed & 0xF, packed >> 4], dim=dim)


def dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode one GGUF tensor's data into a float32 tensor of torch shape `shape`."""
    raw = np.array(raw, copy=True)  # from a read-only memory map; torch wants writable memory
    if qtype == Q.F32:
        return torch.from_numpy(raw.view(np.float32)).reshape(shape)
    if qtype == Q.F16:
        return torch.from_numpy(raw.view(np.float16)).reshape(shape).float()
    if qtype == Q.BF16:
        bits = torch.from_numpy(raw.view(np.int16)).to(torch.int32) << 16
        return bits.view(torch.float32).reshape(shape)
    if qtype in _GGUF_PY_TYPES:
        return torch.from_numpy(gguf_dequantize(raw, qtype)).float().reshape(shape)
    if qtype not in _BLOCK_BYTES:
        raise UnsupportedModelError(
            f"tensor type {qtype.name} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    blocks = torch.from_numpy(raw.view(np.uint8).reshape(-1, _BLOCK_BYTES[qtype]))
    if qtype in Q8_TYPES:
        q8, scale, offset = _q8_fields(blocks, qtype)
        values = q8.float() * scale if offset is None else q8.float() * scale + offset
    else:
        q, scale, offset = _q4_fields(blocks, qtype)
        values = q.float() * scale + offset
    return values.reshape(shape)


def _q4_fields(
    blocks: torch.Tensor, qtype: GGMLQuantizationType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks [B, bytes] as 32-weight blocks (q [B', 32] uint8 0-15, scale
    [B', 1], offset [B', 1]) float32, weight = q * scale + offset; B' = B, or 8 B for Q4_K."""
    if qtype == Q.Q4_K:
        return _q4k_fields(blocks)
    # Q4_0's offset is -8 scale: both products exact, so the same values as (q - 8) * scale.
    # Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    packed = blocks[:, -16:]
    q = split_nibbles(packed, dim=1)
    scale = _f16(blocks[:, :2])
    offset = -8.0 * scale if qtype == Q.Q4_0 else _f16(blocks[:, 2:4])
    return q, scale, offset


def _q4k_fields(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks [B, 144]: float16 d and dmin, then 12 bytes holding eight 6-bit scales
    sc and mins m, then 128 bytes of nibbles. Block j's weights are d sc_j q - dmin m_j, so
    scale d sc_j and offset -dmin m_j: float16 times a 6-bit integer, exact in float32, and q
    scale exact too (the sum rounds as gguf's d sc q - dmin m does). Bytes 0-3 hold sc_0-3 in
    their low 6 bits, 4-7 m_0-3; bytes 8-11 hold sc_4-7's low 4 bits and m_4-7's, whose top 2
    bits are the top 2 of bytes 0-3 (sc) and 4-7 (m). Each 32 bytes of nibbles hold block 2i in
    their low nibbles and block 2i + 1 in their high ones."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    low, high, mixed = blocks[:, 4:16].reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([low & 0x3F, (mixed & 0x0F) | ((low >> 6) << 4)], dim=1)
    m = torch.cat([high & 0x3F, (mixed >> 4) | ((high >> 6) << 4)], dim=1)
    nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = split_nibbles(nibbles, dim=2).reshape(-1, 32)
    scale = (d * sc.float()).reshape(-1, 1)
    offset = -(dmin * m.float()).reshape(-1, 1)
    return q, scale, offset


Q4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)  # what q4_blocks takes
# what q8_blocks takes
Q8_TYPES = (
    Q.Q8_0, Q.Q6_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS, *_GRID_TYPES,
)  # fmt: skip


def _nibbles_in_order(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [B, n] -> [B, 2n]: each byte's low nibble, then its high one, byte after byte."""
    return torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def _grid_scales(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The grid i-quants' scale of each group [B, 256 / G] float32, as gguf computes it: the
    IQ2s d (0.5 + s) / 4 and IQ3_XXS d (0.5 + s) / 2 (s: the top 4 bits of the 32-bit words
    after each group's grid indices, or 4-bit fields of the trailing bytes for IQ2_XS/IQ2_S),
    IQ3_S d (1 + 2 s), the IQ1s d (2 s + 1) / 8 (their weights are in eighths: grid values of
    -1/0/1 plus a delta of +-1/8). IQ1_M's float16 d is spread over the top nibbles of its four
    16-bit scale words, each of which holds four 3-bit s."""

    def words(lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return blocks[:, lo:hi].contiguous().view(dtype).to(torch.int64)

    if qtype in (Q.IQ2_XXS, Q.IQ3_XXS):
        at = 2 if qtype == Q.IQ2_XXS else 66
        s = words(at, at + 64 if qtype == Q.IQ2_XXS else at + 32, torch.int32) & 0xFFFFFFFF
        if qtype == Q.IQ2_XXS:
            s = s.reshape(-1, 8, 2)[:, :, 1]
        factor = 0.25 if qtype == Q.IQ2_XXS else 0.5
        return _f16(blocks[:, :2]) * (0.5 + (s >> 28).float()) * factor
    if qtype in (Q.IQ2_XS, Q.IQ2_S):
        s = _nibbles_in_order(blocks[:, -8:])
        return _f16(blocks[:, :2]) * (0.5 + s.float()) * 0.25
    if qtype == Q.IQ3_S:
        return _f16(blocks[:, :2]) * (1 + 2 * _nibbles_in_order(blocks[:, -4:])).float()
    if qtype == Q.IQ1_S:
        s = (words(34, 50, torch.int16) >> 12) & 7
        return _f16(blocks[:, :2]) * (2 * s + 1).float() / 8
    # IQ1_M
    w = words(48, 56, torch.int16) & 0xFFFF
    d = (w[:, 0] >> 12) | ((w[:, 1] >> 8) & 0xF0) | ((w[:, 2] >> 4) & 0xF00) | (w[:, 3] & 0xF000)
    d = torch.where(d >= 1 << 15, d - (1 << 16), d)  # as int16, to view its bits as float16
    d = d.to(torch.int16).view(torch.float16).float()[:, None]
    s = torch.stack([(w >> (3 * i)) & 7 for i in range(4)], dim=2).reshape(-1, 16)
    return d * (2 * s + 1).float() / 8


def _grid_fields(
    blocks: torch.Tensor, qtype: GGMLQuantizationType
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """A grid i-quant as _q8_fields gives it: gguf decodes the weights, _grid_scales reads each
    group's scale, and q = weight / scale, checked to give the weights back bit for bit (a
    RuntimeError otherwise: a decoder bug, never a silent change)."""
    group = _GRID_TYPES[qtype][1]
    scale = _grid_scales(blocks, qtype).reshape(-1, 1)
    values = torch.from_numpy(gguf_dequantize(blocks.numpy(), qtype)).float().reshape(-1, group)
    q = torch.where(scale == 0, 0.0, values / scale).round()
    if not (q.abs().max() <= 127 and torch.equal(q * scale, values)):
        raise RuntimeError(f"{qtype.name} blocks did not decode into int8 times their scales")
    return q.to(torch.int8), scale, None


def _two_bit_order(packed: torch.Tensor) -> torch.Tensor:
    """Q2_K's and Q3_K's 64 bytes of 2-bit fields [B, 64] -> [B, 256] in weight order: each
    half of 32 bytes holds 128 weights, bits 2s, 2s + 1 of byte l being weight 32 s + l."""
    halves = packed.reshape(-1, 2, 1, 32)
    return torch.cat([(halves >> (2 * s)) & 3 for s in range(4)], dim=2).reshape(-1, 256)


def _low_k_fields(
    blocks: torch.Tensor, qtype: GGMLQuantizationType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q2_K, Q3_K, IQ4_NL and IQ4_XS as _q8_fields gives them; every scale a float16 value
    times a small integer and every product with q exact in float32, as for the others.

    Q2_K [B, 84]: 16 bytes of 4-bit scales sc (low) and mins m (high), 64 bytes of 2-bit q,
    float16 d and dmin; weight = d sc_j q - dmin m_j (groups of 16). Q3_K [B, 110]: 32 bytes
    whose bit b of byte l is weight 32 b + l's third bit h, 64 bytes of its low 2 bits, 12 bytes
    of 6-bit scales, float16 d; weight = d (sc_j - 32) (q2 - 4 (1 - h)). Its scales: bytes 0-7
    hold scales 0-7's low 4 bits in their low nibbles and 8-15's in their high ones; bits
    2s, 2s + 1 of bytes 8-11 are the top 2 bits of scale 4s + i (byte 8 + i). IQ4_NL [B, 18]:
    float16 d, then 16 bytes of 4-bit codes (weights 0-15 low, 16-31 high); weight = d
    level[code]. IQ4_XS [B, 136]: float16 d, a 16-bit word and 4 bytes of 6-bit scales (block
    j: the nibble j of the bytes, bits 2j, 2j + 1 of the word), then IQ4_NL's codes for eight
    blocks of 32; weight = d (sc_j - 32) level[code]."""
    if qtype == Q.Q2_K:
        sc, m = blocks[:, :16] & 0xF, blocks[:, :16] >> 4
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        q = _two_bit_order(blocks[:, 16:80]).to(torch.int8).reshape(-1, 16)
        return q, (d * sc.float()).reshape(-1, 1), (-(dmin * m.float())).reshape(-1, 1)
    if qtype == Q.Q3_K:
        h = blocks[:, :32].reshape(-1, 1, 32)
        h = torch.cat([(h >> b) & 1 for b in range(8)], dim=1).reshape(-1, 256)
        q = _two_bit_order(blocks[:, 32:96]).to(torch.int8) - 4 * (1 - h.to(torch.int8))
        packed = blocks[:, 96:108]
        low = split_nibbles(packed[:, :8], dim=1)
        top = torch.cat([(packed[:, 8:12] >> (2 * s)) & 3 for s in range(4)], dim=1)
        sc = (low | (top << 4)).to(torch.int16) - 32
        scale = _f16(blocks[:, 108:110]) * sc.float()
        return q.reshape(-1, 16), scale.reshape(-1, 1), None
    if qtype == Q.IQ4_NL:
        codes = split_nibbles(blocks[:, 2:], dim=1)
        return _IQ4_LEVELS[codes.long()], _f16(blocks[:, :2]), None
    # IQ4_XS
    word = blocks[:, 2].to(torch.int32) | blocks[:, 3].to(torch.int32) << 8
    top = ((word[:, None] >> (2 * torch.arange(8))) & 3).to(torch.uint8)
    sc = (_nibbles_in_order(blocks[:, 4:8]) | (top << 4)).to(torch.int16) - 32
    scale = _f16(blocks[:, :2]) * sc.float()
    codes = split_nibbles(blocks[:, 8:].reshape(-1, 8, 16), dim=2)
    return _IQ4_LEVELS[codes.long()].reshape(-1, 32), scale.reshape(-1, 1), None


def _q8_fields(
    blocks: torch.Tensor, qtype: GGMLQuantizationType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """8-bit (or 5- and 6-bit) blocks [B, bytes] as groups of G weights: (q [B', G] int8, scale
    [B', 1], offset [B', 1] or None) float32, weight = q * scale (+ offset): G = 32 (B' = B, or
    8 B for Q5_K and IQ4_XS), 16 for Q6_K, Q2_K and Q3_K (B' = 16 B). Every scale is a float16
    value times a small integer, exact in float32, and so is q * scale: the sum rounds as
    gguf's does.

    Q6_K: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales sc, float16 d; a
    weight is d sc_j (q6 - 32). Each 128 weights take 64 low-nibble bytes (weights 0-63 in the
    low nibbles, 64-127 in the high ones) and 32 bytes of high parts (weights 32 i to 32 i + 31
    in bits 2 i, 2 i + 1). The 5-bit types keep 4 bits as Q4_0/Q4_1/Q4_K do and the fifth in a
    bitfield: Q5_0 d (q5 - 16), Q5_1 d q5 + m, Q5_K d sc_j q5 - dmin m_j."""
    if qtype == Q.Q8_0:
        return blocks[:, 2:].contiguous().view(torch.int8), _f16(blocks[:, :2]), None
    if qtype in (Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS):
        return _low_k_fields(blocks, qtype)
    if qtype in _GRID_TYPES:
        return _grid_fields(blocks, qtype)
    if qtype == Q.Q6_K:
        low = blocks[:, :128].reshape(-1, 2, 1, 64)
        low = split_nibbles(low, dim=2).reshape(-1, 8, 32)
        high = blocks[:, 128:192].reshape(-1, 2, 1, 32)
        high = torch.cat([(high >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, 8, 32)
        q6 = (low | (high << 4)).to(torch.int16) - 32
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
        scale = _f16(blocks[:, 208:210]) * sc
        return q6.to(torch.int8).reshape(-1, 16), scale.reshape(-1, 1), None
    if qtype == Q.Q5_K:  # Q4_K's fields around 32 bytes whose bit i is block i's fifth bits
        q4, scale, offset = _q4k_fields(torch.cat([blocks[:, :16], blocks[:, 48:]], dim=1))
        bits = blocks[:, 16:48].reshape(-1, 1, 32)
        fifth = torch.cat([(bits >> i) & 1 for i in range(8)], dim=1).reshape(-1, 32)
        return (q4 | (fifth << 4)).to(torch.int8), scale, offset
    # Q5_0 / Q5_1: d (and m), 4 bytes whose bit j is weight j's fifth, then Q4_0's nibbles
    q4 = split_nibbles(blocks[:, -16:], dim=1)  # as Q4_0's: weight j low, weight j + 16 high
    at = 2 if qtype == Q.Q5_0 else 4
    word = blocks[:, at : at + 4].to(torch.int64)
    word = word[:, 0] | word[:, 1] << 8 | word[:, 2] << 16 | word[:, 3] << 24
    fifth = ((word[:, None] >> torch.arange(32)) & 1).to(torch.uint8)
    q5 = (q4 | (fifth << 4)).to(torch.int16)
    scale = _f16(blocks[:, :2])
    if qtype == Q.Q5_0:
        return (q5 - 16).to(torch.int8), scale, None
    return q5.to(torch.int8), scale, _f16(blocks[:, 2:4])


# A Q4 weight [N, K] as (scale, offset, q): W[n, k] = scale[n, k // 32] * q[n, k] +
# offset[n, k // 32]; scale, offset float32 [N, K/32], q uint8 [N, K] (0-15)
Q4Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def q4_blocks(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> Q4Blocks | None:
    """A Q4_0, Q4_1 or Q4_K matrix as its 32-weight blocks (Q4Blocks): the values `dequantize`
    gives, for kernels that keep the 4 bits. None for other types."""
    if qtype not in Q4_TYPES or len(shape) != 2:
        return None
    n, k = shape
    raw = np.array(raw, copy=True)  # from a read-only memory map
    blocks = torch.from_numpy(raw.view(np.uint8).reshape(-1, _BLOCK_BYTES[qtype]))
    q, scale, offset = _q4_fields(blocks, qtype)
    return scale.reshape(n, k // 32), offset.reshape(n, k // 32), q.reshape(n, k)


class Q8Blocks(NamedTuple):
    """An 8-bit weight [N, K]: W[n, k] = scale[n, k // G] * q[n, k] (+ offset[n, k // G]); scale
    and offset float32 [N, K/G], q int8 [N, K]; G = 32 (Q8_0, the 5-bit types, the IQ4s) or 16
    (Q2_K, Q3_K, Q6_K)."""

    scale: torch.Tensor
    q: torch.Tensor
    offset: torch.Tensor | None = None


def q8_blocks(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> Q8Blocks | None:
    """A matrix of one of Q8_TYPES as int8 blocks (Q8Blocks): the values `dequantize` gives.
    None for other types."""
    if qtype not in Q8_TYPES or len(shape) != 2:
        return None
    n, k = shape
    raw = np.array(raw, copy=True)
    nbytes = _GRID_TYPES[qtype][0] if qtype in _GRID_TYPES else _BLOCK_BYTES[qtype]
    blocks = torch.from_numpy(raw.view(np.uint8).reshape(-1, nbytes))
    q, scale, offset = _q8_fields(blocks, qtype)
    scale = scale.reshape(n, -1).contiguous()
    offset = None if offset is None else offset.reshape(n, -1).contiguous()
    return Q8Blocks(scale, q.reshape(n, k).contiguous(), offset)


# -- file parsing ----------------------------------------------------------------------------------
# gguf.GGUFReader builds a numpy view per array element (~5 s for a 49k-token vocabulary), so the
# header is parsed here with struct over one bytes read; tensor data stays memory-mapped.

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP_SCALARS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first), i.e. GGUF's dims reversed
    qtype: GGMLQuantizationType
    data: np.ndarray  # raw bytes, memory-mapped


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        out = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _NP_SCALARS:
                arr = np.frombuffer(
                    self.buf, dtype=_NP_SCALARS[etype], count=count, offset=self.pos
                )
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.unpack(_SCALARS[vtype])


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Parse a GGUF v2/v3 file into (metadata, tensors by GGUF name)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw))  # type: ignore[arg-type]
    if bytes(cur.buf[:4]) != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, qtype_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise UnsupportedModelError(
                f"{path}: tensor {name} has unknown type id {qtype_id}"
            ) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims)) // block * type_size
        data = raw[start + offset : start + offset + nbytes]
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, data)
    return meta, tensors


def _unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of Q/K so HF's rotate-half RoPE applies."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFWeights:
    """A GGUF file seen as HF-named float32 tensors (`model.layers.0.self_attn.q_proj.weight`)."""

    _LAYER_NAMES: ClassVar[dict[str, str]] = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    _TOP_NAMES: ClassVar[dict[str, str]] = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    }

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.meta, raw_tensors = read_gguf(path)
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise UnsupportedModelError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.gguf_arch = str(self.field("general.architecture"))
        if self.gguf_arch not in _ARCHS:
            raise UnsupportedModelError(
                f"{path}: GGUF architecture {self.gguf_arch!r} is not supported "
                f"(supported: {', '.join(_ARCHS)})"
            )
        self.tensors = {self._hf_name(name): t for name, t in raw_tensors.items()}
        if "rope_freqs.weight" in self.tensors:
            raise UnsupportedModelError(
                f"{path}: per-frequency RoPE factors (rope_freqs) are not supported"
            )
        self._num_heads = int(self.field(f"{self.gguf_arch}.attention.head_count"))
        self._num_kv_heads = int(
            self.field(f"{self.gguf_arch}.attention.head_count_kv", self._num_heads)
        )

    def field(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)

    def _hf_name(self, name: str) -> str:
        parts = name.split(".")
        if parts[0] == "blk":
            base = self._LAYER_NAMES.get(parts[2], parts[2])
            return f"model.layers.{parts[1]}.{base}.{parts[3]}"
        base = self._TOP_NAMES.get(parts[0], parts[0])
        return f"{base}.{'.'.join(parts[1:])}"

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        w = dequantize(t.data, t.qtype, t.shape)
        heads = self._rope_heads(name)
        return w if heads is None else _unpermute_rope_rows(w, heads)

    def numel(self, name: str) -> int:
        return math.prod(self.tensors[name].shape)

    def block_bits(self, name: str) -> int | None:
        """4 where q4_blocks(name) gives blocks, 8 where q8_blocks(name) does, else None (from
        the header alone)."""
        t = self.tensors.get(name)
        if t is None or len(t.shape) != 2:
            return None
        if t.qtype in Q4_TYPES:
            return 4
        return 8 if t.qtype in Q8_TYPES else None

    def blocks(self, name: str) -> Q4Blocks | Q8Blocks | None:
        """q4_blocks(name) or q8_blocks(name), whichever the tensor's type has."""
        bits = self.block_bits(name)
        return self.q4_blocks(name) if bits == 4 else self.q8_blocks(name) if bits == 8 else None

    def q4_blocks(self, name: str) -> Q4Blocks | None:
        """`get(name)` as 4-bit blocks (gguf.q4_blocks, rows in the same order), or None where
        the tensor is not Q4_0 / Q4_1 / Q4_K."""
        t = self.tensors[name]
        parts = q4_blocks(t.data, t.qtype, t.shape)
        heads = self._rope_heads(name)
        if parts is None or heads is None:
            return parts
        scale, offset, q = (_unpermute_rope_rows(x, heads) for x in parts)
        return scale, offset, q

    def q8_blocks(self, name: str) -> Q8Blocks | None:
        """`get(name)` as 8-bit blocks (gguf.q8_blocks, rows in the same order), or None where
        the tensor is not Q8_0 / Q6_K / Q5_0 / Q5_1 / Q5_K."""
        t = self.tensors[name]
        parts = q8_blocks(t.data, t.qtype, t.shape)
        heads = self._rope_heads(name)
        if parts is None or heads is None:
            return parts
        scale, q = (_unpermute_rope_rows(x, heads) for x in parts[:2])
        offset = None if parts.offset is None else _unpermute_rope_rows(parts.offset, heads)
        return Q8Blocks(scale, q, offset)

    def _rope_heads(self, name: str) -> int | None:
        """The head count whose Q/K row interleave llama.cpp applied to tensor `name`, or None."""
        if self.gguf_arch != "llama":
            return None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return self._num_heads
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return self._num_kv_heads
        return None

    def arch_config(self) -> ArchConfig:
        a = self.gguf_arch
        heads = self._num_heads
        hidden = int(self.field(f"{a}.embedding_length"))
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            vocab = len(self.field("tokenizer.ggml.tokens", []))
        eos = self.field("tokenizer.ggml.eos_token_id")
        eot = self.field("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
        bos = self.field("tokenizer.ggml.bos_token_id")
        return ArchConfig(
            architecture=_ARCHS[a],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_layers=int(self.field(f"{a}.block_count")),
            num_heads=heads,
            num_kv_heads=self._num_kv_heads,
            head_dim=int(self.field(f"{a}.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="lm_head.weight" not in self.tensors,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in self.tensors,
            eos_token_ids=eos_ids,
            bos_token_id=int(bos) if bos is not None else None,
        )
