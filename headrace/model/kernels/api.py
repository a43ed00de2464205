"""The binding of api.h, which declares every function and struct Python uses: read_api turns
its prototypes into ctypes signatures and `bind` types a built object's functions with them, so
no argument list is kept by hand (the C definitions are compiled against the same header)."""

from __future__ import annotations

import ctypes
import re
import types
from pathlib import Path
from typing import Any, NamedTuple

import torch

DTYPES = (torch.float32, torch.bfloat16)  # what every kernel reads and writes
API_HEADER = Path(__file__).parent / "api.h"
_C_TYPES: dict[str, Any] = {
    "void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
}  # fmt: skip


class CApi(NamedTuple):
    """What api.h declares: functions (return type, argument types), structs (fields) and
    integer constants, as ctypes types."""

    functions: dict[str, tuple[Any, list[Any]]]
    structs: dict[str, list[tuple[str, Any]]]
    constants: dict[str, int]


def _c_decl(decl: str) -> tuple[str, Any]:
    """`const float *q` -> ("q", c_void_p); `int64_t B` -> ("B", c_int64). Any pointer is an
    address; a type this binding does not know is an error, not a guess."""
    m = re.fullmatch(r"(?:const )?(\w+) ?(\**) ?(\w+)", " ".join(decl.split()))
    if m is None or (not m[2] and m[1] not in _C_TYPES):
        raise ValueError(f"api.h: no ctypes type for {decl.strip()!r}")
    return m[3], ctypes.c_void_p if m[2] else _C_TYPES[m[1]]


def read_api(text: str) -> CApi:
    """Parse api.h's text (its plain subset of C: one-line #defines of integers, typedef'd
    structs of pointers and scalars, HR_API prototypes)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    constants = {m[1]: int(m[2]) for m in re.finditer(r"^\s*#define (\w+) (\d+)\s*$", text, re.M)}
    structs = {}
    for body, name in re.findall(r"typedef struct \{(.*?)\} (\w+);", text, re.S):
        fields = []
        for decl in filter(str.strip, body.split(";")):
            first, *more = decl.split(",")
            fields.append(_c_decl(first))
            base = first.strip().rsplit(" ", 1)[0].rstrip("*").strip()
            fields += [_c_decl(f"{base} {other}") for other in more]
        structs[name] = fields
    functions = {}
    for ret, name, params in re.findall(r"HR_API (\w+) (\w+)\((.*?)\);", text, re.S):
        args = [] if params.strip() == "void" else [_c_decl(p)[1] for p in params.split(",")]
        functions[name] = (_C_TYPES[ret], args)
    return CApi(functions, structs, constants)


API = read_api(API_HEADER.read_text())
# amx_linear's weight formats: what amx_pack and amx_pack_q4 return; and decode_layers'
# W_Q4F32, a Q4Packed weight (q4_linear's) behind a Q4Weight, W_Q8F32, a Q8Linear's behind a
# Q8Weight, and W_SPLIT, parts of those behind a SplitWeight
W_BF16, W_Q4, W_Q4F32, W_Q8F32, W_SPLIT = (
    API.constants[n] for n in ("W_BF16", "W_Q4", "W_Q4F32", "W_Q8F32", "W_SPLIT")
)
# the KV cache's element formats, by the cache tensor's dtype
KV_FORMATS = {
    torch.float32: API.constants["KV_F32"],
    torch.bfloat16: API.constants["KV_BF16"],
    torch.float8_e4m3fn: API.constants["KV_E4M3"],
    torch.float8_e5m2: API.constants["KV_E5M2"],
}


# an fp8 cache's (k_scale, v_scale): it holds K / k_scale and V / v_scale; (1, 1) where none
KVScales = tuple[float, float]
NO_SCALES: KVScales = (1.0, 1.0)


def kv_format(kv_cache: torch.Tensor) -> int:
    """The kernels' code (api.h's KV_*) for the cache's dtype; KeyError for one they lack."""
    return KV_FORMATS[kv_cache.dtype]


def bind(lib: ctypes.CDLL) -> Any:
    """Every function api.h declares, typed, as attributes of one object."""
    fns = {}
    for name, (restype, argtypes) in API.functions.items():
        fn = lib[name]
        fn.restype, fn.argtypes = restype, argtypes
        fns[name] = fn
    return types.SimpleNamespace(**fns)
