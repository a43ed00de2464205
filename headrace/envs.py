"""Every environment variable headrace reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """HEADRACE_CACHE_DIR: where converted tokenizers are kept (default ~/.cache/headrace)."""
    return Path(os.environ.get("HEADRACE_CACHE_DIR") or Path.home() / ".cache" / "headrace")


def api_key() -> str | None:
    """HEADRACE_API_KEY, or VLLM_API_KEY for drop-in manifests: the default of `--api-key`."""
    return os.environ.get("HEADRACE_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def test_load_delay() -> float:
    """HEADRACE_TEST_LOAD_DELAY: seconds added to model loading, so tests can watch `loading`."""
    return float(os.environ.get("HEADRACE_TEST_LOAD_DELAY") or 0.0)


def test_engine_dies_from_start() -> int | None:
    """HEADRACE_TEST_ENGINE_DIES_FROM_START=N (tests only): an engine process whose start number
    (0 for the first of its rank, +1 per restart) is N or more fails while loading, so tests
    can watch restarts run out."""
    value = os.environ.get("HEADRACE_TEST_ENGINE_DIES_FROM_START", "")
    return int(value) if value.strip() else None


def openai_api_key() -> str | None:
    """OPENAI_API_KEY: the key `headrace bench serve` sends (as `vllm bench serve` does)."""
    return os.environ.get("OPENAI_API_KEY") or None


def disable_kernels() -> bool:
    """HEADRACE_DISABLE_KERNELS=1: the model on CPU uses torch ops only, not the compiled C
    kernels (model/kernels.py), and its KV cache is float32."""
    return _switch("HEADRACE_DISABLE_KERNELS")


def disable_amx_linear() -> bool:
    """HEADRACE_DISABLE_AMX_LINEAR=1: bf16 linears stay on oneDNN alone, holding one copy of the
    weights instead of two (slower decode steps; see README, Models)."""
    return _switch("HEADRACE_DISABLE_AMX_LINEAR")


def disable_fused_decode() -> bool:
    """HEADRACE_DISABLE_FUSED_DECODE=1: decode steps call the kernels layer by layer from Python
    instead of as one call (model/fused.py); the same outputs, slower."""
    return _switch("HEADRACE_DISABLE_FUSED_DECODE")


def disable_amx_attention() -> bool:
    """HEADRACE_DISABLE_AMX_ATTENTION=1: prompt chunks over a bf16 cache keep the float32-FMA
    attention kernel instead of the AMX one (model/kernels.py); outputs within ~1e-5, slower."""
    return _switch("HEADRACE_DISABLE_AMX_ATTENTION")


def disable_four_bit() -> bool:
    """HEADRACE_DISABLE_FOUR_BIT=1: the linears of a GGUF model with 4-bit weights do not read
    the file's blocks: AMX linears hold bf16 tiles (layers.AmxLinear; the same outputs, three
    times the bytes read per decode step), float32 ones their float32 weight alone
    (layers.Q4Linear; five times the bytes)."""
    return _switch("HEADRACE_DISABLE_FOUR_BIT")


def _switch(name: str) -> bool:
    """An on/off variable: set to anything but "" or "0" is on."""
    return os.environ.get(name, "") not in ("", "0")
