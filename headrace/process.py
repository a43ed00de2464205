"""Small process helpers shared by every headrace process."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent (the launcher) dies, so a
    `kill -9` of the launcher never leaves engines or API servers behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        pass


TITLE_PREFIX = "headrace::"


def set_title(role: str) -> None:
    """Title this process `headrace::<role>` (e.g. `headrace::EngineCore_1`) as `ps`, `top` and
    /proc/PID/cmdline show it, like vLLM's `VLLM::EngineCore`; /proc/PID/comm gets its first
    15 bytes."""
    import setproctitle

    setproctitle.setproctitle(TITLE_PREFIX + role)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
