"""A decode step's decoder layers in one C call (kernels/decode_step.c), where every linear is an
AmxLinear (bf16, AMX tiles) or every one reads GGUF blocks in float32 (Q4Linear, Q8Linear, or a
SplitLinear of those: float32 activations whatever the weights' dtype).

Layer by layer, a decode step makes ~9 kernel calls per layer from Python, each its own OpenMP
parallel region. With the engine's OMP_WAIT_POLICY=PASSIVE (idle threads sleep, leaving the
cores to the API server), each region wakes the second thread, and at one request those wake-ups
and the Python between the calls took about as long as the arithmetic. decode_layers runs all
layers in one region, its phases separated by a barrier that spins briefly before it sleeps.
The arithmetic is the separate kernels', in the same order: the hidden states are the same bits
as the layer-by-layer path (tests/model/test_fused.py).

It takes steps of decodes only (one new token per request), up to the linears' max_rows of them
(128 AMX; block linears 128 or 16, see layers._BlockLinear); any other step, and models whose
linears are neither, keep the layer-by-layer path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, cast

import torch

from headrace.model.attention import AttentionMetadata
from headrace.model.kernels import (
    KV_FORMATS,
    W_Q4F32,
    W_Q8F32,
    W_SPLIT,
    DecodeLayer,
    Kernels,
    LinearPart,
    Q4Weight,
    Q8Weight,
    SplitWeight,
    weight_format,
)
from headrace.model.layers import AmxLinear, Q4Linear, Q8Linear, SplitLinear

if TYPE_CHECKING:
    from headrace.model.llama import LlamaDecoderLayer, LlamaForCausalLM


def _decoder_layers(model: LlamaForCausalLM) -> list[LlamaDecoderLayer]:
    return [cast("LlamaDecoderLayer", m) for m in model.layers]


def layer_linears(layer: LlamaDecoderLayer) -> tuple[torch.nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


class FusedDecode:
    """The model's decode steps through decode_layers: it holds the layer table (weight and
    cache addresses) and the scratch the C function works in."""

    def __init__(self, model: LlamaForCausalLM, kernels: Kernels, max_rows: int, f32: bool) -> None:
        cfg = model.cfg
        self.model = model
        self.kernels = kernels
        self.dims = (
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size,
        )  # fmt: skip
        self.scale = cfg.head_dim**-0.5
        self.eps = model.norm.eps
        self.max_rows = max_rows
        self.f32 = f32  # block linears: float32 activations (else AmxLinears: bf16)
        self._layers: ctypes.Array[DecodeLayer] | None = None
        # what the layer table points to for float32 linears (kept alive with it)
        self._weights: list[ctypes.Structure | ctypes.Array[LinearPart]] = []
        self._caches_key: tuple[object, ...] = ()
        # for the most rows `takes` lets through (~4.6 MB for SmolLM2 on AMX)
        most = kernels.decode_layers_scratch(max_rows, *self.dims, self.f32)
        self._scratch = torch.empty(most, dtype=torch.uint8)

    @staticmethod
    def build(model: LlamaForCausalLM, kernels: Kernels | None) -> FusedDecode | None:
        """A FusedDecode for `model`, or None where decode_layers cannot run it: no kernels, a
        head size not a multiple of 16, or linears that are not all AmxLinear with bf16 output
        (bf16 weights, AMX kernels) nor all Q4Linear (float32 activations, whatever the
        weights' dtype)."""
        if kernels is None or model.cfg.head_dim % 16:
            return None
        linears = [x for layer in _decoder_layers(model) for x in layer_linears(layer)]
        dtype = model.dtype
        amx = all(isinstance(x, AmxLinear) and x.out_dtype == dtype for x in linears)
        if dtype == torch.bfloat16 and kernels.amx and amx:
            return FusedDecode(model, kernels, AmxLinear.max_rows, f32=False)
        readers = [p for x in linears for p in (x.parts if isinstance(x, SplitLinear) else [x])]
        if all(isinstance(x, Q4Linear | Q8Linear) for x in readers):
            most = min(cast("Q4Linear | Q8Linear", x).max_rows for x in readers)
            return FusedDecode(model, kernels, most, f32=True)
        return None

    def takes(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step is decodes only, few enough for the linears' kernels."""
        return (
            meta.ops.kernels is not None
            and len(meta.groups) == 1
            and meta.groups[0].q_lens is None
            and num_tokens <= self.max_rows
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
        embeds = model.embed_tokens(input_ids)
        return self.kernels.decode_layers(
            self._layer_table(kv_caches),
            embeds.float() if self.f32 else embeds,
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
            kv_cache.dtype,
            self._scratch,
        )

    def _layer_table(self, kv_caches: list[torch.Tensor]) -> ctypes.Array[DecodeLayer]:
        """The layers' weights and caches as decode_layers reads them, built again only when
        the caches are new tensors (or their scales new)."""
        layers = _decoder_layers(self.model)
        key = (
            *(c.data_ptr() for c in kv_caches),
            *(layer.self_attn.kv_scales for layer in layers),
        )
        if self._layers is not None and key == self._caches_key:
            return self._layers

        def addr(x: torch.Tensor | None) -> int | None:
            return None if x is None else x.data_ptr()

        table = (DecodeLayer * len(kv_caches))()
        self._weights = []

        def keep(struct: ctypes.Structure) -> int:
            self._weights.append(struct)
            return ctypes.addressof(struct)

        def weight(x: torch.nn.Module) -> tuple[int | None, int]:
            """A linear's weight address and format for the table."""
            if isinstance(x, Q4Linear):
                q4 = Q4Weight(addr(x.q4.nibbles), addr(x.q4.scale), addr(x.q4.offset))
                return keep(q4), W_Q4F32
            if isinstance(x, Q8Linear):
                group = x.q.shape[1] // x.scale.shape[1]
                q8 = Q8Weight(addr(x.q), addr(x.scale), addr(x.offset), group)
                return keep(q8), W_Q8F32
            if isinstance(x, SplitLinear):
                parts = (LinearPart * len(x.parts))()
                self._weights.append(parts)
                for entry, part in zip(parts, x.parts, strict=True):
                    reader = cast("Q4Linear | Q8Linear", part)
                    entry.weight, entry.fmt = weight(reader)
                    entry.bias, entry.rows = addr(reader.bias), reader.out_features
                return keep(SplitWeight(ctypes.addressof(parts), len(parts))), W_SPLIT
            assert isinstance(x, AmxLinear)
            return addr(x.packed), weight_format(x.packed)

        for entry, layer, cache in zip(table, layers, kv_caches, strict=True):
            assert cache.dtype in KV_FORMATS and cache.is_contiguous()
            qkv, o, gate_up, down = layer_linears(layer)
            entry.input_norm = addr(layer.input_layernorm.weight)
            entry.post_norm = addr(layer.post_attention_layernorm.weight)
            entry.qkv, entry.qkv_fmt = weight(qkv)
            entry.o, entry.o_fmt = weight(o)
            entry.gate_up, entry.gate_up_fmt = weight(gate_up)
            entry.down, entry.down_fmt = weight(down)
            # (a SplitLinear has none: its parts have theirs)
            bias = [addr(getattr(x, "bias", None)) for x in (qkv, o, gate_up, down)]
            entry.qkv_bias, entry.o_bias, entry.gate_up_bias, entry.down_bias = bias
            entry.k_cache, entry.v_cache = addr(cache[0]), addr(cache[1])
            entry.k_scale, entry.v_scale = layer.self_attn.kv_scales
        self._layers, self._caches_key = table, key
        return table
