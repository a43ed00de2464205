"""The binding of decode_step.c: a decode step's decoder layers in one call (model/fused.py)."""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from headrace.model.kernels.api import API, DTYPES, KV_FORMATS


class DecodeLayer(ctypes.Structure):
    """api.h's decode_layer: one decoder layer's norm weights, linears (biases or NULL) and K/V
    caches, as addresses, and the linears' formats."""

    _fields_ = API.structs["decode_layer"]


class Q4Weight(ctypes.Structure):
    """api.h's q4_weight: a Q4Packed weight's addresses, as decode_layers reads a W_Q4F32
    linear."""

    _fields_ = API.structs["q4_weight"]


class Q8Weight(ctypes.Structure):
    """api.h's q8_weight: a Q8Linear's int8 weight, scales and offsets (or NULL) and its group,
    as decode_layers reads a W_Q8F32 linear."""

    _fields_ = API.structs["q8_weight"]


class LinearPart(ctypes.Structure):
    """api.h's linear_part: one part of a W_SPLIT linear (its weight, bias, rows and format)."""

    _fields_ = API.structs["linear_part"]


class SplitWeight(ctypes.Structure):
    """api.h's split_weight: a W_SPLIT linear's parts, as an array of LinearPart."""

    _fields_ = API.structs["split_weight"]


class DecodeStep:
    """Kernels' methods over decode_step.c."""

    c: Any

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
        """Bytes of scratch decode_layers needs for `tokens` tokens (f32: block linears)."""
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
        kv_dtype: torch.dtype,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """Every decoder layer of a decode step and the final norm in one call (C:
        decode_layers): embeds [T, hidden] (bf16 for AMX linears, float32 for block ones), token
        t being request t's new token at positions[t], written to slots[t]; block_table [T, W],
        ctx_lens [T] int64. dims:
        (hidden, heads, kv_heads, head_dim, intermediate, block_size). Returns [T, hidden]
        float32. The caller keeps `layers`' weights and caches, and `scratch` (at least
        decode_layers_scratch bytes), alive."""
        t = embeds.shape[0]
        hidden, heads, kv_heads, head_dim, inter, block_size = dims
        f32 = embeds.dtype == torch.float32
        assert embeds.dtype in DTYPES and embeds.is_contiguous()
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
            kv_heads, head_dim, inter, block_size, scale, KV_FORMATS[kv_dtype], scratch.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out
