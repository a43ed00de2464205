"""Compiling the kernel files into one shared object for this CPU, cached on disk, and checking
that it runs on torch's OpenMP runtime."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from headrace import envs

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = tuple(sorted(HERE.glob("*.c")))  # one shared object; HEADERS are part of its key
HEADERS = tuple(sorted(HERE.glob("*.h")))
FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden", "-shared",
    "-fPIC", "-std=gnu11",
)  # fmt: skip


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]  # fmt: skip


def openmp_runtimes(lib: ctypes.CDLL) -> tuple[str | None, str | None]:
    """The files of the OpenMP runtime `lib` calls into and of the one torch calls into (None
    where it cannot be told): `omp_get_max_threads` as each library's own lookup resolves it.
    Other libraries may bring runtimes of their own (sentencepiece does); only these two
    matter."""
    libtorch = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    torch_lib = ctypes.CDLL(str(libtorch)) if libtorch.exists() else None
    libc = ctypes.CDLL(None)

    def file_of(handle: ctypes.CDLL | None) -> str | None:
        if handle is None:
            return None
        try:
            fn = handle["omp_get_max_threads"]
        except AttributeError:
            return None
        info = _DlInfo()
        if not libc.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
        return os.path.realpath(info.dli_fname.decode())

    return file_of(lib), file_of(torch_lib)


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = b"\0".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(
        b"\0".join([source, version.stdout.encode(), " ".join(flags).encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    target = envs.cache_dir() / "kernels" / key / "cpu_kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: engines starting together never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built the CPU kernels: %s", target)
    return target


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))
