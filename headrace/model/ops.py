"""The decoder's steps around its linears, written once per backend (model/backend.py picks
which): `TorchOps`, torch alone, on any device; `KernelOps`, the CPU C kernels (model/kernels/),
which hands the shapes the kernels do not take to TorchOps. Layers call `meta.ops.<step>` and
never ask which they have.

Every step returns what TorchOps' returns (dtypes included): the residual stream, RoPE and
attention are float32; the norm's output has the asked dtype; SwiGLU's activation its input's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headrace.model.attention import AttentionMetadata, AttnGroup, torch_attend, write_kv
from headrace.model.kernels import Kernels
from headrace.model.kernels.api import NO_SCALES, KVScales
from headrace.model.layers import RotaryEmbedding


class TorchOps:
    """torch ops alone: any device, any shape (the padded attention layout)."""

    kernels: Kernels | None = None

    def prefill_padded(self, head_dim: int) -> bool:
        """Whether prompt-chunk groups need build_group's padded layout and mask."""
        return True

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual) * weight in out_dtype, x + residual in float32)."""
        x = x.float()
        if residual is not None:
            x = x + residual
        return F.rms_norm(x, (x.shape[-1],), weight, eps).to(out_dtype), x

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        slot_mapping: torch.Tensor,
        kv_cache: torch.Tensor,
        num_heads: int,
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        """Rotate q and k of the fused projection qkv [T, (H + 2 KH) D], write k and v into the
        cache at slot_mapping (an fp8 one's over kv_scales); returns the rotated q [T, H, D]
        float32."""
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        qkv = qkv.float()
        n = qkv.shape[0]
        q, k, v = qkv.split([num_heads * head_dim, *[num_kv_heads * head_dim] * 2], dim=-1)
        q, k = rope(positions, q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim))
        write_kv(kv_cache, slot_mapping, k, v.view(n, num_kv_heads, head_dim), kv_scales)
        return q

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        """Attention of q [T, H, D] over the cache (this step's K/V already in it), group by
        group -> [T, H * D]."""
        outs = [self.attend_group(q[g.tokens], kv_cache, g, scale, kv_scales) for g in meta.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend_group(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        group: AttnGroup,
        scale: float,
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        return torch_attend(q, kv_cache, group, scale, kv_scales)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] [..., 2I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def logprobs(
        self, logits: torch.Tensor, targets: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of [N, V] logits and its token: (the token's logprob, its rank: 1 + how many
        tokens are likelier, the top k logprobs, their ids)."""
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        chosen = x.gather(1, targets.unsqueeze(1))
        rank = (x > chosen).sum(dim=1, dtype=torch.int64) + 1
        top_lp, top_ids = x.topk(k, dim=-1) if k else (x[:, :0], x[:, :0].long())
        return chosen.squeeze(1) - lse, rank, top_lp - lse.unsqueeze(1), top_ids


class KernelOps(TorchOps):
    """The CPU C kernels of one build, where they take the shapes."""

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = self._k = kernels

    def prefill_padded(self, head_dim: int) -> bool:
        return not Kernels.handles_prefill(head_dim)

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2:
            return super().add_rms_norm(x, residual, weight, eps, out_dtype)
        return self._k.add_rms_norm(x, residual, weight, eps, out_dtype)

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        slot_mapping: torch.Tensor,
        kv_cache: torch.Tensor,
        num_heads: int,
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        return self._k.rope_write_kv(
            qkv, positions, rope.cos, rope.sin, slot_mapping, kv_cache, num_heads, kv_scales
        )

    def attend_group(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        group: AttnGroup,
        scale: float,
        kv_scales: KVScales = NO_SCALES,
    ) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        if group.q_lens is None:  # decodes always take the kernel
            out = self._k.paged_decode_attention(
                q.float(), kv_cache, group.blocks, group.ctx_lens, scale, kv_scales
            )
        elif not group.padded:  # prompt chunks where built for it
            out = self._k.paged_prefill_attention(
                q.float(), kv_cache, group.blocks, group.q_lens, group.ctx_lens, scale,
                kv_scales=kv_scales,
            )  # fmt: skip
        else:
            return super().attend_group(q, kv_cache, group, scale, kv_scales)
        return out.view(-1, num_heads * head_dim)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dim() != 2:
            return super().silu_mul(gate_up)
        return self._k.silu_mul(gate_up)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self._k.argmax(logits)

    def logprobs(
        self, logits: torch.Tensor, targets: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._k.logprobs(logits, targets, k)


TORCH_OPS = TorchOps()


def ops_for(kernels: Kernels | None) -> TorchOps:
    """KernelOps over `kernels`, or TorchOps where there are none."""
    return TORCH_OPS if kernels is None else KernelOps(kernels)
