"""The binding of decode_attention.c: decode attention over the paged cache."""

from __future__ import annotations

from typing import Any

import torch

from headrace.model.kernels.api import KV_FORMATS, NO_SCALES, KVScales, kv_format


class DecodeAttention:
    """Kernels' methods over decode_attention.c."""

    c: Any

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        ctx_lens: torch.Tensor,
        scale: float,
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        """q [B, H, D] float32; kv_cache [2, blocks, block_size, KH, D] of a dtype in KV_FORMATS
        (an fp8 one with its kv_scales); block_table [B, W] and ctx_lens [B] int64
        (1 <= ctx_lens <= W * block_size). Returns [B, H, D] float32."""
        b, h, d = q.shape
        _, _, block_size, kh, _ = kv_cache.shape
        q = q.contiguous()
        assert q.dtype == torch.float32 and kv_cache.is_contiguous()
        assert kv_cache.dtype in KV_FORMATS
        assert block_table.dtype == ctx_lens.dtype == torch.int64
        assert block_table.is_contiguous() and ctx_lens.is_contiguous()
        out = torch.empty_like(q)
        self.c.paged_decode_attention(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            block_table.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(),
            b, block_table.shape[1], h, kh, d, block_size, scale,
            kv_format(kv_cache), *kv_scales, torch.get_num_threads(),
        )  # fmt: skip
        return out
