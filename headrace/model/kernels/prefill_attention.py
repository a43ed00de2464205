"""The binding of prefill_attention.c and amx_attention.c: causal attention of prompt chunks over
the paged cache (float32 FMA, or AMX tiles for a bf16 cache)."""

from __future__ import annotations

from typing import Any

import torch

from headrace.model.kernels.api import KV_FORMATS, NO_SCALES, KVScales, kv_format


class PrefillAttention:
    """Kernels' methods over prefill_attention.c, amx_attention.c."""

    c: Any
    amx: bool

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
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        """Causal attention of several query tokens per request over the cache (their own K/V
        already in it). q [sum(q_lens), H, D] float32, request b's rows after request b-1's;
        its query i sits at position ctx_lens[b] - q_lens[b] + i. kv_cache, kv_scales as for decode;
        block_table [B, W], q_lens and ctx_lens [B] int64. Returns [sum(q_lens), H, D]
        float32. amx: None picks by prefill_on_amx; False forces the float32 kernel."""
        _, h, d = q.shape
        _, _, block_size, kh, _ = kv_cache.shape
        q = q.contiguous()
        assert q.dtype == torch.float32 and kv_cache.is_contiguous() and self.handles_prefill(d)
        assert kv_cache.dtype in KV_FORMATS
        assert block_table.dtype == q_lens.dtype == ctx_lens.dtype == torch.int64
        assert block_table.is_contiguous() and q_lens.is_contiguous() and ctx_lens.is_contiguous()
        if amx is None:
            amx = self.prefill_on_amx(kv_cache.dtype, d)
        assert not amx or self.prefill_on_amx(kv_cache.dtype, d)
        out = torch.empty_like(q)
        args = (
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            block_table.data_ptr(), q_lens.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(),
            block_table.shape[0], block_table.shape[1], h, kh, d, block_size, scale,
            kv_format(kv_cache),
        )  # fmt: skip
        if amx:  # a bf16 cache: no scales
            self.c.paged_prefill_attention_amx(*args, torch.get_num_threads())
        else:
            self.c.paged_prefill_attention(*args, *kv_scales, torch.get_num_threads())
        return out
