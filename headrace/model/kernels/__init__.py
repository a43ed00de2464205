"""headrace's CPU kernels: C files compiled on first use with the host's C compiler (build.py)
and loaded with ctypes.

Why C and not a torch extension: the files need no torch headers, so they build in about a
second instead of a minute, and the shared object is cached (HEADRACE_CACHE_DIR/kernels, keyed
by sources, compiler, flags and CPU), so later starts only load it. It is compiled for this CPU
(`-march=native`, less what the compute backend turns off: model/backend.py) and links
`libgomp.so.1`, which resolves to the OpenMP runtime torch has already loaded: the kernels run
on torch's thread pool, not a second one.

Each kernel family is a C file with its Python binding beside it, a class that `Kernels`
brings together:
- decode_attention, prefill_attention (+ amx_attention.c): attention read through the block
  table where K and V lie, instead of a gathered, padded and masked copy of the cache;
- elementwise: residual add + RMSNorm, RoPE + the cache write, SwiGLU's activation, greedy's
  argmax: runs of tiny torch ops that at decode sizes cost their thread wake-ups more than their
  arithmetic;
- amx_linear (tile primitives in amx.h): on CPUs with AMX-BF16, bf16 linears of up to 128 rows
  (layers.AmxLinear) at up to twice oneDNN's rate, reading GGUF 4-bit weights as stored;
- q4_linear: without AMX, float32 linears of up to 128 rows reading a GGUF's 4-bit blocks (and
  the LM head its 8-bit ones): AVX-512 or AVX2 + FMA, or plain C (layers.Q4Linear, Q8Linear);
- decode_step: a decode step's decoder layers in one call over either kind of linear
  (model/fused.py).
api.h declares what Python calls and api.py types every call from it; common.h holds what the
C files share among themselves.
"""

from __future__ import annotations

import ctypes

from headrace.model.kernels.amx_linear import AmxLinears, weight_format
from headrace.model.kernels.api import API, DTYPES, W_BF16, W_Q4, W_Q4F32, W_Q8F32, W_SPLIT, bind
from headrace.model.kernels.api import KV_FORMATS as KV_FORMATS
from headrace.model.kernels.api import read_api as read_api
from headrace.model.kernels.build import build, openmp_runtimes
from headrace.model.kernels.decode_attention import DecodeAttention
from headrace.model.kernels.decode_step import (
    DecodeLayer,
    DecodeStep,
    LinearPart,
    Q4Weight,
    Q8Weight,
    SplitWeight,
)
from headrace.model.kernels.elementwise import Elementwise
from headrace.model.kernels.prefill_attention import PrefillAttention
from headrace.model.kernels.q4_linear import Q4Linears, Q4Packed


class Kernels(DecodeAttention, PrefillAttention, Elementwise, AmxLinears, Q4Linears, DecodeStep):
    """One build of the kernels: its typed C functions (`c`, from api.h) and each family's
    Python around them."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.c = bind(lib)
        self.vector_bits = int(self.c.q4_linear_vector_bits())  # 0: plain C
        self.amx = bool(self.c.amx_available())


def build_kernels(extra_flags: tuple[str, ...] = ()) -> Kernels:
    """Compile (or take from the cache) and load the kernels; `extra_flags` after -march=native,
    e.g. ("-mno-avx2", "-mno-fma") for the plain-C twins of the vector paths."""
    return Kernels(ctypes.CDLL(str(build(extra_flags))))


__all__ = [
    "API", "DTYPES", "W_BF16", "W_Q4", "W_Q4F32", "W_Q8F32", "W_SPLIT", "DecodeLayer", "Kernels",
    "LinearPart", "Q4Packed", "Q4Weight", "Q8Weight", "SplitWeight", "build_kernels",
    "openmp_runtimes", "read_api", "weight_format",
]  # fmt: skip
