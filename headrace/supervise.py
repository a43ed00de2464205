"""Restarting children in place: the back-off and limit, and the board the launcher shares with
the API servers.

A child that exits (or that the API servers report stalled) is started again after a back-off
of 1 s, 2 s, 4 s ... (at most MAX_BACKOFF_S), as long as it restarted fewer than
`max_restarts` times in the last `window_s` seconds; past that it stays down and the server
reports `failed`.

The board is a small array in shared memory, one row per data-parallel rank, written by the
launcher (status, pid) and by the API servers (a stall report), read by both:

    row e:  [status, pid, stall_reported]
            status  UP (running, loading, or down with a restart due) | FAILED (for good)
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from headrace.config import EngineConfig
from headrace.wire.sockets import Addresses

logger = logging.getLogger("headrace.launch")

MAX_BACKOFF_S = 30.0
K = TypeVar("K")


class RankStatus(enum.IntEnum):
    """A rank as its launcher sees it; the API servers see a down process for themselves."""

    UP = 0
    FAILED = 1


@dataclass(slots=True)
class RestartPolicy:
    """When a child that stopped may start again: a delay in seconds, or None (out of
    restarts). Pure logic; the caller passes the clock."""

    max_restarts: int = 3
    window_s: float = 600.0
    base_backoff_s: float = 1.0
    recent: deque[float] = field(default_factory=deque)

    def next_delay(self, now: float) -> float | None:
        while self.recent and now - self.recent[0] > self.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.max_restarts:
            return None
        delay = min(MAX_BACKOFF_S, self.base_backoff_s * 2 ** len(self.recent))
        self.recent.append(now + delay)
        return delay


class RestartSchedule(Generic[K]):
    """The restart policy of each child, by key, and the restarts that are due."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.policies: dict[K, RestartPolicy] = {}
        self.due: dict[K, tuple[float, str]] = {}  # key -> (restart time, reason)

    def ended(self, key: K, reason: str, now: float) -> float | None:
        """Child `key` ended: the delay before it starts again, or None (out of restarts)."""
        policy = self.policies.setdefault(key, RestartPolicy(self.max_restarts))
        delay = policy.next_delay(now)
        if delay is not None:
            self.due[key] = (now + delay, reason)
        return delay

    def pending(self, key: K) -> bool:
        return key in self.due

    def take_due(self, now: float) -> list[tuple[K, str]]:
        """The children to start now, with what ended their last process."""
        ready = [(key, reason) for key, (when, reason) in self.due.items() if now >= when]
        for key, _ in ready:
            del self.due[key]
        return ready


_FIELDS = 3


class EngineBoard:
    """Per-rank status shared by the launcher and its API servers (see the module doc).
    Ranks on other machines stay UP with pid 0: the coordinator speaks for them."""

    def __init__(self, num_ranks: int, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self.num_ranks = num_ranks
        self._a = ctx.RawArray("q", _FIELDS * num_ranks)

    def status(self, rank: int) -> RankStatus:
        return RankStatus(self._a[_FIELDS * rank])

    def set_status(self, rank: int, status: RankStatus) -> None:
        self._a[_FIELDS * rank] = int(status)

    def pid(self, rank: int) -> int | None:
        return int(self._a[_FIELDS * rank + 1]) or None

    def set_pid(self, rank: int, pid: int | None) -> None:
        self._a[_FIELDS * rank + 1] = pid or 0

    def report_stall(self, rank: int) -> None:
        self._a[_FIELDS * rank + 2] = 1

    def take_stall(self, rank: int) -> bool:
        """Launcher: whether a stall was reported since the last call (and clear it)."""
        reported = bool(self._a[_FIELDS * rank + 2])
        self._a[_FIELDS * rank + 2] = 0
        return reported


def exit_reason(exitcode: int | None) -> str:
    """`exit N`, or the name of the signal that ended a process."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit {exitcode}"


@dataclass(frozen=True, slots=True)
class EngineSpawn:
    """What an engine process of this machine is started with, but its rank."""

    engine: EngineConfig
    addresses: Addresses
    load_delay_s: float = 0.0
    num_threads: int = 0


class EngineKeeper:
    """This machine's engine processes, one per local rank, kept running: an engine that exits,
    or that the API servers report stalled (killed first), is started again after its policy's
    back-off; out of restarts, its rank is FAILED on the board."""

    def __init__(
        self,
        spawn: EngineSpawn,
        ranks: tuple[int, ...],
        board: EngineBoard,
        max_restarts: int,
        on_restart: Callable[[int, str], None] | None = None,
    ) -> None:
        self.spawn = spawn
        self.board = board
        self.procs: dict[int, BaseProcess] = {}
        self.starts = dict.fromkeys(ranks, 0)
        self.schedule: RestartSchedule[int] = RestartSchedule(max_restarts)
        self.stalled: set[int] = set()
        self.on_restart = on_restart

    def start_all(self) -> None:
        for rank in self.starts:
            self._start(rank)

    def _start(self, rank: int) -> None:
        from headrace.engine.proc import EngineProcConfig, run_engine_core

        s = self.spawn
        cfg = EngineProcConfig(
            rank, s.engine, s.addresses, s.load_delay_s, s.num_threads, self.starts[rank]
        )
        mp = multiprocessing.get_context("spawn")
        proc = mp.Process(target=run_engine_core, args=(cfg,), name=f"EngineCore_{rank}")
        proc.start()
        self.procs[rank] = proc
        self.starts[rank] += 1
        self.board.set_pid(rank, proc.pid)
        self.board.set_status(rank, RankStatus.UP)

    def tick(self, now: float) -> list[int]:
        """Kill stalled engines, schedule restarts of exited ones, start those that are due.
        Returns the ranks that ran out of restarts just now."""
        newly_failed = []
        for rank, proc in list(self.procs.items()):
            if self.board.take_stall(rank) and proc.is_alive():
                logger.error("engine %d stalled (reported by an API server): killing it", rank)
                self.stalled.add(rank)
                proc.kill()
                proc.join(5)
            if proc.exitcode is None:
                continue
            del self.procs[rank]
            reason = "stall" if rank in self.stalled else exit_reason(proc.exitcode)
            self.stalled.discard(rank)
            delay = self.schedule.ended(rank, reason, now)
            if delay is None:
                logger.error("engine %d ended (%s) and is out of restarts: failed", rank, reason)
                self.board.set_status(rank, RankStatus.FAILED)
                newly_failed.append(rank)
                continue
            logger.error("engine %d ended (%s); restarting it in %.0f s", rank, reason, delay)
        for rank, reason in self.schedule.take_due(now):
            if self.on_restart is not None:
                self.on_restart(rank, reason)
            self._start(rank)
        return newly_failed

    def sentinels(self) -> list[int]:
        return [p.sentinel for p in self.procs.values() if p.is_alive()]

    def stop(self, grace_s: float) -> None:
        self.schedule.due.clear()
        terminate(list(self.procs.values()), grace_s)


def terminate(procs: list[BaseProcess], grace_s: float, signal_them: bool = True) -> None:
    """SIGTERM (unless already sent), wait up to `grace_s`, then SIGKILL what is left."""
    for proc in procs:
        if signal_them and proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("%s did not stop in %.0f s; killing it", proc.name, grace_s)
            proc.kill()
            proc.join(5)
