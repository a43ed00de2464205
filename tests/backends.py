"""The compute backends this machine can run (model/backend.py), for tests that run every path
the hardware allows: each kernel build is compiled once at collection (then cached on disk)."""

from __future__ import annotations

import pytest

from headrace.model.backend import CPU_BACKENDS, backend_kernels, runnable
from headrace.model.kernels import Kernels

RUNNABLE = [name for name in CPU_BACKENDS if runnable(name) is None]
KERNEL_BUILDS = [name for name in RUNNABLE if name != "torch"]
BEST_BUILD = KERNEL_BUILDS[0] if KERNEL_BUILDS else None


def amx_kernels() -> Kernels:
    """The AMX build, or a skip where this CPU (or its OS) has no AMX-BF16 tiles."""
    reason = runnable("amx")
    if reason is not None:
        pytest.skip(f"AMX tiles: {reason}")
    return backend_kernels("amx")
