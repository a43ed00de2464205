"""The binding of elementwise.c: residual add + RMSNorm, RoPE + the cache write, SwiGLU's
activation, greedy's argmax."""

from __future__ import annotations

from typing import Any

import torch

from headrace.model.kernels.api import DTYPES, KV_FORMATS, NO_SCALES, KVScales, kv_format


class Elementwise:
    """Kernels' methods over elementwise.c."""

    c: Any

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
        assert x.dtype in DTYPES and out_dtype in DTYPES and weight.dtype == torch.float32
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
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        """Rotate-half RoPE on the q and k parts of `qkv` [T, (H + 2 KH) * D] (float32 or
        bfloat16), rotated k and v written to `kv_cache` at `slot_mapping` (an fp8 one's over
        kv_scales); returns rotated q [T, H, D] float32. cos/sin: [max_positions, D] float32;
        positions, slots: [T] int64."""
        qkv = qkv.contiguous()
        _, _, _, kh, d = kv_cache.shape
        t = qkv.shape[0]
        assert qkv.shape[1] == (num_heads + 2 * kh) * d and qkv.dtype in DTYPES
        assert kv_cache.dtype in KV_FORMATS and kv_cache.is_contiguous()
        assert cos.dtype == sin.dtype == torch.float32
        assert cos.is_contiguous() and sin.is_contiguous()
        assert positions.dtype == slot_mapping.dtype == torch.int64
        positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
        q = torch.empty(t, num_heads, d, dtype=torch.float32)
        self.c.rope_write_kv(
            qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), positions.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), q.data_ptr(),
            kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), kv_format(kv_cache), *kv_scales,
            t, num_heads, kh, d, torch.get_num_threads(),
        )  # fmt: skip
        return q

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for x = [gate | up] [T, 2I] float32 or bfloat16 -> [T, I], x's dtype."""
        x = x.contiguous()
        t, two_i = x.shape
        assert x.dtype in DTYPES and two_i % 2 == 0
        out = torch.empty(t, two_i // 2, dtype=x.dtype)
        self.c.silu_mul(
            x.data_ptr(), out.data_ptr(), int(x.dtype == torch.bfloat16), t, two_i // 2,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def logprobs(
        self, x: torch.Tensor, targets: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For [N, V] float32 or bfloat16 logits and a token per row: (the token's logprob,
        its rank, the top k logprobs, their ids), as log_softmax, a count and topk give them,
        in one call over the logits."""
        x = x.contiguous()
        rows, n = x.shape
        assert x.dtype in DTYPES and 0 <= k <= 64
        targets = targets.to(torch.int64).contiguous()
        target_lp = torch.empty(rows, dtype=torch.float32)
        rank = torch.empty(rows, dtype=torch.int64)
        top_lp = torch.empty(rows, k, dtype=torch.float32)
        top_ids = torch.empty(rows, k, dtype=torch.int64)
        self.c.logprob_rows(
            x.data_ptr(), int(x.dtype == torch.bfloat16), rows, n, targets.data_ptr(), k,
            target_lp.data_ptr(), rank.data_ptr(), top_lp.data_ptr(), top_ids.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return target_lp, rank, top_lp, top_ids

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x.argmax(dim=-1) for [N, V] float32 or bfloat16 (first index of the maximum, a NaN
        counting as the maximum, as torch): one read of the logits, no upcast copy."""
        x = x.contiguous()
        rows, n = x.shape
        assert x.dtype in DTYPES
        out = torch.empty(rows, dtype=torch.int64)
        self.c.argmax_rows(
            x.data_ptr(), int(x.dtype == torch.bfloat16), rows, n, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out
