"""Llama-family decoder (Llama, Qwen2, Mistral, SmolLM) over a flattened batch of tokens.

The forward pass takes every scheduled token of every request as one `[T]` row of ids; attention
is the only place that knows which rows belong together (`AttentionMetadata`).
"""

from __future__ import annotations

import torch
from torch import nn

from headrace.model.attention import AttentionMetadata, attend, paged_attention
from headrace.model.fused import FusedDecode
from headrace.model.layers import AmxLinear, RMSNorm, RotaryEmbedding, SwiGLU
from headrace.model.registry import ArchConfig


class LlamaAttention(nn.Module):
    """Fused QKV projection, RoPE, paged attention, output projection."""

    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rope = rope
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if meta.kernels is not None:  # CPU: RoPE and the cache write in one C call
            q = meta.kernels.rope_write_kv(
                qkv, positions, self.rope.cos, self.rope.sin, meta.slot_mapping, kv_cache,
                self.num_heads,
            )  # fmt: skip
            return self.o_proj(attend(q, kv_cache, meta, self.scale).to(x.dtype))
        qkv = qkv.float()
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n = x.shape[0]
        q, k = self.rope(
            positions,
            q.view(n, self.num_heads, self.head_dim),
            k.view(n, self.num_kv_heads, self.head_dim),
        )
        v = v.view(n, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.to(x.dtype))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with a float32 residual stream."""

    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.compute_dtype = dtype  # the linears' dtype; norms and the residual stay float32

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, kernels = self.compute_dtype, meta.kernels
        h, residual = self.input_layernorm(x, residual, dtype, kernels)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual, dtype, kernels)
        return self.mlp(h, kernels), residual


class LlamaForCausalLM(nn.Module):
    """The whole decoder plus LM head. Qwen2 and Mistral differ only in config (biases, window)."""

    def __init__(self, cfg: ArchConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, rope, dtype) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = rope
        # decode steps in one C call, where every linear runs on the AMX kernel (the loader
        # sets it after packing the linears; fused.py)
        self.fused_decode: FusedDecode | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Return the final hidden states [T, hidden] (float32)."""
        fused = self.fused_decode
        if fused is not None and fused.takes(meta, input_ids.shape[0]):
            return fused(input_ids, positions, kv_caches, meta)
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, cache, meta)
        x, _ = self.norm(x, residual, kernels=meta.kernels)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the rows that sample: logits [N, vocab] in the model's dtype, or float32
        where the LM head is an AmxLinear (layers.py). The sampler upcasts only when it has to;
        a greedy argmax does not need it."""
        return self.lm_head(hidden.to(self.dtype))

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """compute_logits(hidden).argmax(-1), where the LM head takes the argmax itself without
        writing logits (layers.AmxLinear.argmax): the same tokens. None elsewhere."""
        if not isinstance(self.lm_head, AmxLinear):
            return None
        return self.lm_head.argmax(hidden.to(self.dtype))
