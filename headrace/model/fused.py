"""A decode step's decoder layers in one C call (csrc: decode_layers), where every linear is an
AmxLinear.

Layer by layer, a decode step makes ~9 kernel calls per layer from Python, each its own OpenMP
parallel region. With the engine's OMP_WAIT_POLICY=PASSIVE (idle threads sleep, leaving the
cores to the API server), each region wakes the second thread, and at one request those wake-ups
and the Python between the calls took about as long as the arithmetic. decode_layers runs all
layers in one region, its phases separated by a barrier that spins briefly before it sleeps.
The arithmetic is the separate kernels', in the same order: the hidden states are the same bits
as the layer-by-layer path (tests/model/test_fused.py).

It takes steps of decodes only (one new token per request), up to AmxLinear.max_rows of them;
any other step, and models whose linears are not all AmxLinear, keep the layer-by-layer path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, cast

import torch

from headrace.model.attention import AttentionMetadata
from headrace.model.kernels import DecodeLayer, Kernels, weight_format
from headrace.model.layers import AmxLinear

if TYPE_CHECKING:
    from headrace.model.llama import LlamaDecoderLayer, LlamaForCausalLM


def _decoder_layers(model: LlamaForCausalLM) -> list[LlamaDecoderLayer]:
    return [cast("LlamaDecoderLayer", m) for m in model.layers]


def _linears(layer: LlamaDecoderLayer) -> tuple[torch.nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


class FusedDecode:
    """The model's decode steps through decode_layers: it holds the layer table (weight and
    cache addresses) and the scratch the C function works in."""

    def __init__(self, model: LlamaForCausalLM, kernels: Kernels) -> None:
        cfg = model.cfg
        self.model = model
        self.kernels = kernels
        self.dims = (
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size,
        )  # fmt: skip
        self.scale = cfg.head_dim**-0.5
        self.eps = model.norm.eps
        self._layers: ctypes.Array[DecodeLayer] | None = None
        self._caches_key: tuple[int, ...] = ()
        # for the most rows `takes` lets through (~4.6 MB for SmolLM2)
        most = kernels.decode_layers_scratch(AmxLinear.max_rows, *self.dims)
        self._scratch = torch.empty(most, dtype=torch.uint8)

    @staticmethod
    def build(model: LlamaForCausalLM, kernels: Kernels | None) -> FusedDecode | None:
        """A FusedDecode for `model`, or None where decode_layers cannot run it (no AMX kernels,
        a linear that is not an AmxLinear with bf16 output, a head size not a multiple of 16)."""
        if kernels is None or not kernels.amx or model.cfg.head_dim % 16:
            return None
        if model.embed_tokens.weight.dtype != torch.bfloat16:
            return None
        for layer in _decoder_layers(model):
            if not all(
                isinstance(x, AmxLinear) and x.out_dtype == torch.bfloat16 for x in _linears(layer)
            ):
                return None
        return FusedDecode(model, kernels)

    def takes(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step is decodes only, few enough for the AMX linears."""
        return (
            meta.kernels is not None
            and len(meta.groups) == 1
            and meta.groups[0].q_lens is None
            and num_tokens <= AmxLinear.max_rows
        )

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The final hidden states [T, hidden] float32, as LlamaForCausalLM.forward's."""
        model, group = self.model, meta.groups[0]
        kv_cache = kv_caches[0]
        return self.kernels.decode_layers(
            self._layer_table(kv_caches),
            model.embed_tokens(input_ids),
            model.norm.weight,
            self.eps,
            positions,
            model.rope.cos,
            model.rope.sin,
            meta.slot_mapping,
            group.blocks,
            group.ctx_lens,
            (*self.dims, kv_cache.shape[2]),
            self.scale,
            kv_cache.dtype == torch.bfloat16,
            self._scratch,
        )

    def _layer_table(self, kv_caches: list[torch.Tensor]) -> ctypes.Array[DecodeLayer]:
        """The layers' weights and caches as decode_layers reads them, built again only when
        the caches are new tensors."""
        key = tuple(c.data_ptr() for c in kv_caches)
        if self._layers is not None and key == self._caches_key:
            return self._layers

        def addr(x: torch.Tensor | None) -> int | None:
            return None if x is None else x.data_ptr()

        table = (DecodeLayer * len(kv_caches))()
        layers = _decoder_layers(self.model)
        for entry, layer, cache in zip(table, layers, kv_caches, strict=True):
            assert cache.dtype in (torch.float32, torch.bfloat16) and cache.is_contiguous()
            qkv, o, gate_up, down = (cast(AmxLinear, x) for x in _linears(layer))
            entry.input_norm = addr(layer.input_layernorm.weight)
            entry.post_norm = addr(layer.post_attention_layernorm.weight)
            entry.qkv, entry.qkv_bias = addr(qkv.packed), addr(qkv.bias)
            entry.o, entry.o_bias = addr(o.packed), addr(o.bias)
            entry.gate_up, entry.gate_up_bias = addr(gate_up.packed), addr(gate_up.bias)
            entry.down, entry.down_bias = addr(down.packed), addr(down.bias)
            entry.k_cache, entry.v_cache = addr(cache[0]), addr(cache[1])
            entry.qkv_fmt, entry.o_fmt = weight_format(qkv.packed), weight_format(o.packed)
            entry.gate_up_fmt = weight_format(gate_up.packed)
            entry.down_fmt = weight_format(down.packed)
        self._layers, self._caches_key = table, key
        return table
