"""Llama-family decoder (Llama, Qwen2, Mistral, SmolLM) over a flattened batch of tokens.

The forward pass takes every scheduled token of every request as one `[T]` row of ids; attention
is the only place that knows which rows belong together (`AttentionMetadata`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from headrace.model.attention import AttentionMetadata
from headrace.model.fused import FusedDecode
from headrace.model.kernels.api import NO_SCALES, KVScales
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
        # an fp8 cache holds K / k_scale and V / v_scale; measure_kv_scales: set them from the
        # next pass (vLLM's --calculate-kv-scales)
        self.kv_scales: KVScales = NO_SCALES
        self.measure_kv_scales = False

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        ops = meta.ops
        qkv = self.qkv_proj(x)
        if self.measure_kv_scales:
            self.kv_scales, self.measure_kv_scales = self._measured_scales(qkv, positions), False
        q = ops.rope_write_kv(
            qkv, positions, self.rope, meta.slot_mapping, kv_cache, self.num_heads, self.kv_scales
        )
        return self.o_proj(ops.attend(q, kv_cache, meta, self.scale, self.kv_scales).to(x.dtype))

    def _measured_scales(self, qkv: torch.Tensor, positions: torch.Tensor) -> KVScales:
        """vLLM's rule: the pass's largest |K| (after RoPE) over 200 and |V| over 100, each in
        float32 (1 where the pass has only zeros)."""
        n = qkv.shape[0]
        _, k, v = qkv.float().split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        _, k = self.rope(positions, k, k)
        scales = [x.abs().amax() / c for x, c in ((k, 200.0), (v, 100.0))]
        k_scale, v_scale = (float(s) if s > 0 else 1.0 for s in scales)
        return k_scale, v_scale


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
        dtype, ops = self.compute_dtype, meta.ops
        h, residual = self.input_layernorm(x, residual, dtype, ops)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual, dtype, ops)
        return self.mlp(h, ops), residual


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

    @property
    def attention(self) -> list[LlamaAttention]:
        """Each decoder layer's attention, in order."""
        return [cast("LlamaDecoderLayer", layer).self_attn for layer in self.layers]

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
        x, _ = self.norm(x, residual, torch.float32, meta.ops)
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
