"""What an API server knows about each engine: its phase and its last report."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from headrace.wire.messages import EngineReady


class EnginePhase(enum.StrEnum):
    """An engine's phase as this API server sees it (the server's state is made from these)."""

    LOADING = "loading"  # starting (or restarting), not READY yet
    READY = "ready"
    DOWN = "down"  # gone; its launcher (or node) restarts it
    FAILED = "failed"  # out of restarts: stays down


@dataclass(slots=True)
class EngineStatus:
    """What this API server knows about one engine."""

    index: int
    phase: EnginePhase = EnginePhase.LOADING
    ever_ready: bool = False
    load_phase: str = "starting"
    load_fraction: float = 0.0
    info: EngineReady | None = None
    last_message_time: float = field(default_factory=time.monotonic)
    error: str | None = None


def process_alive(pid: int | None) -> bool:
    """True unless `pid` is gone or a zombie (exited, not yet reaped by the launcher)."""
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may contain spaces.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")
