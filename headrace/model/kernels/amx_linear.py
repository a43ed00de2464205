"""The binding of amx_linear.c: bf16 linears on AMX tiles, weights packed as bf16 tiles or
GGUF 4-bit blocks."""

from __future__ import annotations

from typing import Any

import torch

from headrace.model.kernels.api import DTYPES, W_BF16, W_Q4


def weight_format(packed: torch.Tensor) -> int:
    """The format of an amx_pack (bf16) or amx_pack_q4 (uint8) result."""
    return W_Q4 if packed.dtype == torch.uint8 else W_BF16


class AmxLinears:
    """Kernels' methods over amx_linear.c."""

    c: Any
    amx: bool

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
        assert x.dtype == torch.bfloat16 and x.shape[-1] == k and out_dtype in DTYPES
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
