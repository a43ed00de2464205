"""The restart policy and the shared board (pure logic; no processes)."""

from __future__ import annotations

import signal

from headrace.supervise import (
    EngineBoard,
    RankStatus,
    RestartPolicy,
    RestartSchedule,
    exit_reason,
)


def test_backoff_doubles_and_the_limit_holds_within_the_window() -> None:
    policy = RestartPolicy(max_restarts=3, window_s=600.0)
    assert [policy.next_delay(t) for t in (0.0, 10.0, 20.0)] == [1.0, 2.0, 4.0]
    assert policy.next_delay(30.0) is None  # a fourth within ten minutes: out of restarts
    assert policy.next_delay(599.0) is None
    # ten minutes after the first restart, it no longer counts
    assert policy.next_delay(602.0) == 4.0


def test_no_restarts_allowed() -> None:
    assert RestartPolicy(max_restarts=0).next_delay(0.0) is None


def test_board_rows_are_independent_and_stalls_are_taken_once() -> None:
    board = EngineBoard(3)
    assert [board.status(r) for r in range(3)] == [RankStatus.UP] * 3
    assert board.pid(1) is None  # a rank on another machine, or not started
    board.set_pid(1, 4242)
    board.set_status(2, RankStatus.FAILED)
    board.report_stall(0)
    assert (board.pid(1), board.status(2), board.status(0)) == (
        4242, RankStatus.FAILED, RankStatus.UP,
    )  # fmt: skip
    assert board.take_stall(0) and not board.take_stall(0) and not board.take_stall(1)


def test_schedule_keeps_each_child_apart_and_hands_out_what_is_due() -> None:
    schedule: RestartSchedule[str] = RestartSchedule(max_restarts=1)
    assert schedule.ended("a", "SIGKILL", 0.0) == 1.0
    assert schedule.ended("b", "exit 1", 0.5) == 1.0
    assert schedule.pending("a") and schedule.take_due(0.9) == []
    assert schedule.take_due(1.2) == [("a", "SIGKILL")]
    assert not schedule.pending("a") and schedule.pending("b")
    assert schedule.take_due(2.0) == [("b", "exit 1")]
    assert schedule.ended("a", "SIGKILL", 3.0) is None  # its one restart is used


def test_exit_reasons() -> None:
    assert exit_reason(-signal.SIGKILL) == "SIGKILL"
    assert exit_reason(1) == "exit 1"
    assert exit_reason(0) == "exit 0"
