"""The compute backend: which code computes the model, chosen once per engine process.

ModelRunner calls `select_backend(device)` at start-up and logs the choice and why; nothing
else asks what the CPU can do. The backend decides the weights' dtype for `--dtype auto`, the KV
cache's dtype, and which C kernels (if any) the model's layers call:

- `amx` (CPUs with AMX-BF16): kernels built for this CPU; bf16 weights; linears on AMX tiles
  that read the GGUF's 4-bit blocks; a decode step's layers in one call; prompt attention on
  tiles.
- `avx512` (CPUs with AVX-512): kernels built without AMX; as `avx2` for decode-sized batches,
  and, where the CPU has AVX512-BF16, bf16 weights on oneDNN for larger ones.
- `avx2` (AVX2 + FMA): kernels built without AVX-512; float32 weights; linears of decode-sized
  batches read the GGUF's 4-bit blocks; a decode step's layers in one call.
- `c` (any CPU with a C compiler): as `avx2`, from the kernels' plain-C twins.
- `torch` (any device, CUDA included): torch ops alone, no C kernels.

`auto` (the default) takes the first of these this machine can run. HEADRACE_CPU_BACKEND names one
instead, for tests that run every path a machine can and for comparing paths; a backend the CPU
cannot run is an error at start-up, not a silent fallback. `avx512` and `avx2` so named also keep
oneDNN and MKL off what the CPU has beyond them, in engine processes (envs.py:
cap_libraries_for_cpu_backend), so that an AMX machine measures what a Zen 4 or an AVX2 CPU
runs. A C build that fails under `auto` is a warning and the `torch` backend.
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from headrace import envs
from headrace.model.kernels import Kernels, build_kernels, openmp_runtimes

logger = logging.getLogger(__name__)

CPU_BACKENDS = ("amx", "avx512", "avx2", "c", "torch")  # best first: `auto` takes the first

_NO_AMX = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
_NO_AVX512 = ("-mno-avx512f", *_NO_AMX)  # -mno-avx512f turns off every AVX-512 extension
# each backend's kernel build: flags after -march=native
_BUILD_FLAGS: dict[str, tuple[str, ...]] = {
    "amx": (),
    "avx512": _NO_AMX,
    "avx2": _NO_AVX512,
    "c": ("-mno-avx2", "-mno-fma", *_NO_AVX512),
}
_X86 = platform.machine() in ("x86_64", "AMD64", "i686")


# `--kv-cache-dtype` names other than auto, as CacheConfig holds them
KV_CACHE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def missing(name: str) -> str | None:
    """Why this machine cannot run CPU backend `name` (None: it can, as far as its flags tell;
    `amx` also needs the OS to grant the tile registers, known only once its kernels load)."""
    flags = cpu_flags()
    need = {
        "amx": ("amx_tile", "amx_bf16", "avx512_bf16"),
        "avx512": ("avx512f", "avx512bw", "avx512vl"),
        "avx2": ("avx2", "fma"),
    }.get(name, ())
    if need and not _X86:
        return f"not an x86 CPU ({platform.machine()})"
    absent = [f for f in need if f not in flags]
    return f"this CPU has no {', '.join(absent)}" if absent else None


@functools.cache
def backend_kernels(name: str) -> Kernels:
    """The C kernels as backend `name` builds them (compiled once, then cached on disk).
    Raises OSError, RuntimeError or CalledProcessError where they cannot be built."""
    flags = _BUILD_FLAGS[name] if _X86 else ()
    kernels = build_kernels(flags)
    ours, torchs = openmp_runtimes(kernels.lib)
    if ours != torchs:  # a torch build whose OpenMP has another soname (libiomp, mangled)
        logger.warning(
            "the CPU kernels run on OpenMP runtime %s, torch on %s: two thread pools share the "
            "cores", ours, torchs,
        )  # fmt: skip
    return kernels


@dataclass(frozen=True, slots=True)
class Backend:
    """The chosen backend: its name, device, kernels (None: torch ops only) and why."""

    name: str
    device: torch.device
    kernels: Kernels | None
    why: str

    @property
    def amx(self) -> bool:
        """Whether linears and prompt attention run on AMX tiles."""
        return self.kernels is not None and self.kernels.amx

    def dtype(self, requested: str) -> torch.dtype:
        """The weights' dtype for `--dtype` (`auto`: bfloat16 where the hardware multiplies it
        fast: CUDA, AMX, AVX512-BF16; float32 elsewhere, where the decode linears read 4-bit
        blocks into float32 arithmetic). float16 (vLLM's `half`, common in GPU manifests) off
        CPU; on CPU, where no backend computes in it, `auto`'s choice, with a warning."""
        if requested == "float16":
            if self.device.type != "cpu":
                return torch.float16
            chosen = self.dtype("auto")
            logger.warning(
                "--dtype float16: the CPU backends do not compute in float16; using %s "
                "(what auto picks here)", str(chosen).removeprefix("torch."),
            )  # fmt: skip
            return chosen
        if requested != "auto":
            return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]
        if self.device.type != "cpu":
            return torch.bfloat16
        bf16_hardware = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
        if self.name in ("avx2", "c") or not bf16_hardware:
            return torch.float32
        if self.name == "torch":  # oneDNN's bf16 only where torch itself uses AVX-512
            caps = torch.backends.cpu.get_cpu_capability()
            return torch.bfloat16 if caps in ("AVX512", "AMX") else torch.float32
        return torch.bfloat16

    def kv_cache_dtype(self, dtype: torch.dtype, requested: str = "auto") -> torch.dtype:
        """For `--kv-cache-dtype` over weights of `dtype`. `auto`: the weights' dtype, except
        on CPU without the C kernels, where it is float32. Attention computes in float32 on CPU
        whatever the cache holds (torch's CPU attention is several times slower in bf16), in
        the weights' dtype elsewhere; the cache's dtype decides how many bytes each decode
        step reads and how many tokens fit: bf16 halves float32's, fp8 quarters them."""
        if requested in KV_CACHE_DTYPES:
            return KV_CACHE_DTYPES[requested]
        if requested != "auto":
            raise ValueError(
                f"kv_cache_dtype {requested!r}: expected auto or {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.device.type == "cpu" and self.kernels is None:
            return torch.float32
        return dtype


def select_backend(device: torch.device, setting: str | None = None) -> Backend:
    """The backend for `device`: `setting` (default HEADRACE_CPU_BACKEND, else `auto`) on CPU;
    `torch` elsewhere. Raises ValueError for a name this machine cannot run."""
    setting = (setting or envs.cpu_backend()).lower()
    if setting != "auto" and setting not in CPU_BACKENDS:
        raise ValueError(
            f"HEADRACE_CPU_BACKEND={setting!r}: expected auto or one of {', '.join(CPU_BACKENDS)}"
        )
    if device.type != "cpu":
        return Backend("torch", device, None, f"device {device.type}")
    if setting == "torch":
        return Backend("torch", device, None, "HEADRACE_CPU_BACKEND=torch")
    if setting != "auto":
        return _forced(setting, device)
    reasons = {}
    for name in CPU_BACKENDS[:-1]:
        reason = reasons[name] = runnable(name)
        if reason is None:
            return Backend(name, device, backend_kernels(name), _why(name))
    # `c` needs only a compiler: its build failed
    logger.warning("CPU kernels unavailable, using torch ops alone: %s", reasons["c"])
    return Backend("torch", device, None, "the C kernels could not be built")


def _forced(name: str, device: torch.device) -> Backend:
    reason = runnable(name)  # a failed build is an error here too: this path was asked for
    if reason is not None:
        raise ValueError(f"HEADRACE_CPU_BACKEND={name}: {reason}")
    caps = " ".join(f"{k}={v}" for k, v in envs.library_caps().items())
    why = f"HEADRACE_CPU_BACKEND={name}" + (f" (torch's libraries: {caps})" if caps else "")
    return Backend(name, device, backend_kernels(name), why)


def _why(name: str) -> str:
    flags = cpu_flags()
    shown = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "fma") if f in flags]
    return f"the best this CPU runs (auto; {' '.join(shown) or 'no vector flags'})"


def runnable(name: str) -> str | None:
    """Why backend `name` cannot run here, or None where it can (its kernels built)."""
    if name == "torch":
        return None
    reason = missing(name)
    if reason is not None:
        return reason
    try:
        kernels = backend_kernels(name)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else e
        return f"its kernels did not build: {detail}"
    if name == "amx" and not kernels.amx:
        return "the OS did not grant the AMX tile registers"
    return None
