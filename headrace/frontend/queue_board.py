"""How many choices and prompt tokens each API server has queued, in shared memory.

The launcher makes one `QueueBoard` and hands it to every API server; each server's output
processor keeps its own row true (`QueueRow`), and admission (`headrace.api.admission`) sums the
rows, so a limit holds for the whole server. A row is written only by its own process. A row
also says whether its server has ever been able to serve: API servers past the first start
taking connections once API server 0 has (`headrace.api.app`).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

# One row per API server; every field is written only by that server.
_IN_FLIGHT, _RESERVED, _PREFILL_TOKENS, _FINISHED, _PREFILLED, _SERVED = range(6)
_FIELDS = 6


class QueueBoard:
    """Every API server's queue counts, in shared memory (launcher -> API servers)."""

    def __init__(self, num_api_servers: int, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self.num_api_servers = num_api_servers
        self._a = ctx.RawArray("q", _FIELDS * num_api_servers)

    def row(self, index: int) -> QueueRow:
        return QueueRow(self._a, index * _FIELDS)

    def clear(self, index: int) -> None:
        """Launcher: API server `index` is gone; its engines abort what it had in flight.
        The running totals stay (they only ever grow)."""
        base = index * _FIELDS
        for f in (_IN_FLIGHT, _RESERVED, _PREFILL_TOKENS):
            self._a[base + f] = 0

    def _sum(self, field: int) -> int:
        a = self._a
        return sum(a[i * _FIELDS + field] for i in range(self.num_api_servers))

    def in_flight(self) -> int:
        return self._sum(_IN_FLIGHT) + self._sum(_RESERVED)

    def prefill_tokens(self) -> int:
        return self._sum(_PREFILL_TOKENS)

    def has_served(self, index: int) -> bool:
        """Whether API server `index` has been able to serve (it stays so through restarts)."""
        return bool(self._a[index * _FIELDS + _SERVED])

    def any_served(self) -> bool:
        """Whether any API server has been able to serve: false while the server first loads."""
        return any(self.has_served(i) for i in range(self.num_api_servers))

    def drained(self) -> tuple[int, int]:
        """Running totals: (choices finished, prompt tokens prefilled)."""
        return self._sum(_FINISHED), self._sum(_PREFILLED)


class QueueRow:
    """One API server's row; the output processor keeps it true as choices live and end."""

    __slots__ = ("_a", "_base")

    def __init__(self, array: Any, base: int) -> None:
        self._a = array
        self._base = base

    def _add(self, field: int, delta: int) -> None:
        self._a[self._base + field] += delta

    def sent(self, prompt_len: int) -> None:
        """A choice is in an engine's hands now (or on its way), still to be prefilled."""
        self._add(_IN_FLIGHT, 1)
        self._add(_PREFILL_TOKENS, prompt_len)

    def prefilled(self, prompt_len: int) -> None:
        """Its first output token came: its prompt left the prefill backlog."""
        self._add(_PREFILL_TOKENS, -prompt_len)
        self._add(_PREFILLED, prompt_len)

    def requeued(self, prompt_len: int) -> None:
        """Re-sent to another engine after its own was lost: prefilled again from scratch."""
        self._add(_PREFILL_TOKENS, prompt_len)

    def ended(self, prompt_len: int, prefilling: bool) -> None:
        self._add(_IN_FLIGHT, -1)
        self._add(_FINISHED, 1)
        if prefilling:
            self._add(_PREFILL_TOKENS, -prompt_len)

    def reserve(self, choices: int) -> None:
        self._add(_RESERVED, choices)

    def served(self) -> None:
        """Its server can serve (ready or degraded)."""
        self._a[self._base + _SERVED] = 1


def local_row() -> QueueRow:
    """A row nobody else reads (an OutputProcessor outside an API server: unit tests)."""
    return QueueBoard(1).row(0)
