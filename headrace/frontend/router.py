"""Which engine gets a new request: the ready engine with the least load.

Load = the engine's last reported running + waiting requests (as published by the engine, or the
coordinator when there are several API servers) plus this server's own in-flight choices there,
which are fresher than any report.
"""

from __future__ import annotations

from collections.abc import Sequence


def pick_engine(ready: Sequence[bool], reported: Sequence[int], in_flight: Sequence[int]) -> int:
    """Index of the least-loaded ready engine; ties go to the lowest index. Raises if none."""
    best = -1
    best_load = 0
    for i, ok in enumerate(ready):
        if not ok:
            continue
        load = max(reported[i], in_flight[i])
        if best < 0 or load < best_load:
            best, best_load = i, load
    if best < 0:
        raise LookupError("no engine is ready")
    return best
