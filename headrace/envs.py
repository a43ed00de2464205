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


def cpu_backend() -> str:
    """HEADRACE_CPU_BACKEND: `auto` (default), `amx`, `avx512`, `avx2`, `c` or `torch`: which code
    computes the model on CPU (model/backend.py)."""
    return os.environ.get("HEADRACE_CPU_BACKEND", "").strip() or "auto"


# What torch's libraries may use under a backend forced below the CPU: oneDNN (bf16 matmuls)
# and MKL (float32 ones) read these once, at their first call, so that `avx512` on an AMX CPU
# runs what a CPU without AMX (a Zen 4) runs, and `avx2` what an AVX2-only one runs.
_LIBRARY_CAPS = {
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def cap_libraries_for_cpu_backend() -> dict[str, str]:
    """Set the library caps of HEADRACE_CPU_BACKEND (unless already set, so that a caller's
    own wins), in a process that has not yet run a matmul: an engine process before it loads
    torch, a benchmark before its first step. Returns the caps now in effect."""
    caps = _LIBRARY_CAPS.get(cpu_backend().lower(), {})
    for name, value in caps.items():
        os.environ.setdefault(name, value)
    return library_caps()


def library_caps() -> dict[str, str]:
    """ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS where set: what the backend's log line
    names, since they change what computes the model's larger matmuls."""
    names = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    return {n: os.environ[n] for n in names if os.environ.get(n)}


def gguf_float_copies() -> bool | None:
    """HEADRACE_GGUF_FLOAT_COPIES: `auto` (default: where they fit in memory), `1` or `0`:
    whether linears that read a GGUF file's blocks also keep the weight dequantized, for prompt
    chunks (model/loader.py: keeps_float_copies). Without, the blocks take every row."""
    value = os.environ.get("HEADRACE_GGUF_FLOAT_COPIES", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"HEADRACE_GGUF_FLOAT_COPIES must be auto, 1 or 0, not {value!r}")
