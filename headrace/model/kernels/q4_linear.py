"""The binding of q4_linear.c: float32 linears reading GGUF 4-bit (Q4_0, Q4_1, Q4_K) and 8-bit
(Q8_0, Q6_K, and the 5-bit types as int8) blocks."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Q4Packed(NamedTuple):
    """A weight for q4_linear: nibbles [N, K/32, 16] uint8, scale and offset [N, K/32]."""

    nibbles: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


class Q4Linears:
    """Kernels' methods over q4_linear.c."""

    c: Any

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
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [M, K] float32 @ W.T (+ bias), W = scale * q (+ offset), q int8 [N, K], a scale
        (and offset) per 32 weights (Q8_0, the 5-bit types) or per 16 (Q6_K's): [N, K/32] or
        [N, K/16] float32."""
        x = x.contiguous()
        m, k = x.shape
        n = q.shape[0]
        group = k // scale.shape[1]
        if group not in (16, 32) or scale.shape[1] * group != k:
            raise ValueError(f"q8_linear: a scale per 16 or 32 weights, not {k}/{scale.shape[1]}")
        if offset is not None and offset.shape != scale.shape:
            raise ValueError("q8_linear: an offset for each scale")
        y = torch.empty(m, n, dtype=torch.float32)
        self.c.q8_linear(
            x.data_ptr(), q.data_ptr(), scale.data_ptr(),
            None if offset is None else offset.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k, group,
            torch.get_num_threads(),
        )  # fmt: skip
        return y
