"""Admission control: vLLM's `--max-num-queued-reqs` and `--max-num-queued-tokens`.

What is counted (vLLM's semantics, for the whole server: every API server and every engine):
- requests: choices in flight (waiting or running in an engine, or between their admission and
  their send); a request with `n` choices, or a batch of prompts, counts every choice;
- tokens: prompt tokens of choices not yet past prefill (no output token yet).

Each API server keeps its own numbers in one row of a `QueueBoard`, an array in shared memory
the launcher hands every API server: admission sums the rows, so the limits hold globally, not
per API server. A row is written only by its own process; two admissions in different API
servers within the same microseconds may both pass (no lock a killed process could leave held).

The check and the count are one step and come before any tokenization: an admitted request
reserves its choices at once (`Admission.admit` is a context manager), so a burst cannot pass
the check while earlier requests are still being tokenized, and a refused one costs nothing.

Over a limit: 503 + `Retry-After`, estimated from the drain rate the board's running totals
show over the last `_RATE_WINDOW_S` seconds, counted in `admission_rejections_total{reason}`.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from headrace.api.errors import APIError
from headrace.frontend.queue_board import QueueBoard
from headrace.metrics.prometheus import ADMISSION_REASONS

REASON_REQUESTS, REASON_TOKENS = ADMISSION_REASONS

_RATE_WINDOW_S = 10.0
DRAIN_SAMPLE_PERIOD_S = 0.5
RETRY_UNKNOWN_S = 5  # nothing drained in the window (or just started): a guess, not a promise
RETRY_MAX_S = 60


class DrainRate:
    """Choices finished and prompt tokens prefilled per second, over the last window."""

    def __init__(self, board: QueueBoard, clock: Callable[[], float] = time.monotonic) -> None:
        self.board = board
        self.clock = clock
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def sample(self) -> None:
        now = self.clock()
        if self.samples and now - self.samples[-1][0] < DRAIN_SAMPLE_PERIOD_S:
            return
        self.samples.append((now, *self.board.drained()))
        # keep one sample at least as old as the window, so the rate spans all of it
        while len(self.samples) > 2 and now - self.samples[1][0] >= _RATE_WINDOW_S:
            self.samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(choices/s, prompt tokens/s); 0 when too little time has passed to tell."""
        self.sample()
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, f0, p0), (t1, f1, p1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        if span < DRAIN_SAMPLE_PERIOD_S:
            return 0.0, 0.0
        return (f1 - f0) / span, (p1 - p0) / span


def retry_after(excess: float, rate: float) -> int:
    """Seconds until `excess` units drain at `rate` per second: at least 1, at most RETRY_MAX_S."""
    if rate <= 0:
        return RETRY_UNKNOWN_S
    return max(1, min(RETRY_MAX_S, math.ceil(excess / rate)))


class Admission:
    """This API server's gate: check and reserve in one step, before any tokenizing."""

    def __init__(
        self,
        board: QueueBoard,
        index: int,
        max_reqs: int | None,
        max_tokens: int | None,
        on_reject: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.board = board
        self.row = board.row(index)
        self.max_reqs = max_reqs
        self.max_tokens = max_tokens
        self.on_reject = on_reject
        self.drain = DrainRate(board, clock)

    @property
    def enabled(self) -> bool:
        return self.max_reqs is not None or self.max_tokens is not None

    @contextmanager
    def admit(self, choices: int) -> Iterator[None]:
        """Hold `choices` slots while the request is tokenized and sent; raise APIError 503
        (with Retry-After) when a limit is reached, 400 when it could never be admitted."""
        self.check(choices)
        self.row.reserve(choices)
        try:
            yield
        finally:  # from here on the output processor counts the choices it was sent
            self.row.reserve(-choices)

    def check(self, choices: int) -> None:
        if self.max_reqs is not None:
            if choices > self.max_reqs:
                raise APIError(
                    400,
                    f"the request has {choices} choices (n times prompts), more than the "
                    f"server's limit of {self.max_reqs} queued requests",
                    param="n",
                )
            in_flight = self.board.in_flight()
            if in_flight + choices > self.max_reqs:
                excess = in_flight + choices - self.max_reqs
                self._refuse(
                    REASON_REQUESTS,
                    f"the server is at its limit of {self.max_reqs} queued requests "
                    f"({in_flight} in flight); retry later",
                    retry_after(excess, self.drain.rates()[0]),
                )
        if self.max_tokens is not None:
            queued = self.board.prefill_tokens()
            if queued >= self.max_tokens:
                excess = queued - self.max_tokens + 1
                self._refuse(
                    REASON_TOKENS,
                    f"the server is at its limit of {self.max_tokens} queued prompt tokens "
                    f"({queued} waiting for prefill); retry later",
                    retry_after(excess, self.drain.rates()[1]),
                )

    def _refuse(self, reason: str, message: str, seconds: int) -> None:
        self.on_reject(reason)
        raise APIError(503, message, headers={"Retry-After": str(seconds)})
