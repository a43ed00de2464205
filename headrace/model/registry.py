"""Supported architectures and the one config type every model reads (`ArchConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(ValueError):
    """The model exists but headrace cannot run it; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class ArchConfig:
    """Shape of a Llama-family decoder, whatever format it was loaded from."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None


def num_parameters(cfg: ArchConfig) -> int:
    """Weights in the checkpoint (a tied LM head counted once), from the shape alone."""
    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size + 2 * h
    if cfg.qkv_bias:
        per_layer += q + 2 * kv
    if cfg.mlp_bias:
        per_layer += 2 * cfg.intermediate_size + h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + cfg.num_layers * per_layer + h + head


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def arch_from_hf_config(cfg: dict[str, Any], source: str, generation: dict[str, Any]) -> ArchConfig:
    """Read an HF `config.json` (and optional `generation_config.json`) into an ArchConfig."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: architectures {archs or '(none)'} are not supported; "
            f"headrace runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    sliding = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        sliding = None
    eos = _as_ids(generation.get("eos_token_id")) or _as_ids(cfg.get("eos_token_id"))
    # transformers >= 5 writes rope settings as one `rope_parameters` dict.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return ArchConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_scaling=rope if rope_type != "default" else None,
        eos_token_ids=eos,
        bos_token_id=cfg.get("bos_token_id"),
        sliding_window=int(sliding) if sliding else None,
    )
