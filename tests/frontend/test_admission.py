"""Admission control: the shared queue board, the gate, and the output processor's counting."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from headrace.api.admission import RETRY_UNKNOWN_S, Admission, retry_after
from headrace.api.errors import APIError
from headrace.frontend.output import OutputProcessor, RequestStream, SeqState, new_detokenizer
from headrace.frontend.queue_board import QueueBoard
from headrace.model.loader import load_tokenizer, resolve_model_path
from headrace.wire.messages import EngineCoreOutput, FinishReason, SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _gate(board: QueueBoard, index: int, reqs: int | None, tokens: int | None = None):
    rejected: list[str] = []
    clock = Clock()
    gate = Admission(board, index, reqs, tokens, rejected.append, clock)
    return gate, rejected, clock


def test_the_limit_holds_across_api_servers_and_reservations_count_at_once() -> None:
    board = QueueBoard(2)
    a, rejected_a, _ = _gate(board, 0, reqs=4)
    b, rejected_b, _ = _gate(board, 1, reqs=4)
    with a.admit(2):  # still tokenizing: nothing sent yet, but the slots are taken
        board.row(1).sent(10)  # server 1 sent one choice
        with pytest.raises(APIError) as exc:
            b.admit(2).__enter__()
        assert exc.value.status == 503 and exc.value.headers is not None
        assert int(exc.value.headers["Retry-After"]) >= 1
        assert rejected_b == ["max_num_queued_reqs"] and rejected_a == []
        with b.admit(1):
            assert board.in_flight() == 4
    assert board.in_flight() == 1  # reservations released; the sent choice still counts


def test_a_request_that_can_never_fit_is_a_400_not_a_503() -> None:
    gate, rejected, _ = _gate(QueueBoard(1), 0, reqs=4)
    with pytest.raises(APIError) as exc:
        gate.check(5)
    assert exc.value.status == 400 and exc.value.param == "n" and rejected == []


def test_queued_tokens_refuse_once_the_prefill_backlog_reaches_the_limit() -> None:
    board = QueueBoard(1)
    gate, rejected, _ = _gate(board, 0, reqs=None, tokens=100)
    row = board.row(0)
    row.sent(60)
    gate.check(1)  # 60 < 100
    row.sent(40)
    with pytest.raises(APIError) as exc:
        gate.check(1)
    assert exc.value.status == 503 and rejected == ["max_num_queued_tokens"]
    row.prefilled(60)  # the first one produced its first token
    gate.check(1)
    row.ended(60, prefilling=False)
    row.ended(40, prefilling=True)
    assert board.prefill_tokens() == 0 and board.in_flight() == 0
    assert board.drained() == (2, 60)


def test_retry_after_follows_the_drain_rate() -> None:
    board = QueueBoard(1)
    gate, _, clock = _gate(board, 0, reqs=2)
    row = board.row(0)
    row.sent(1)
    row.sent(1)
    gate.drain.sample()
    with pytest.raises(APIError) as exc:  # no rate known yet: the fallback
        gate.check(1)
    assert exc.value.headers == {"Retry-After": str(RETRY_UNKNOWN_S)}
    for _ in range(10):  # one choice finishes and another arrives every 2 s
        clock.now += 2.0
        row.ended(1, prefilling=False)
        row.sent(1)
        gate.drain.sample()
    with pytest.raises(APIError) as exc:  # 0.5 choices/s; 1 must finish for 1 to fit
        gate.check(1)
    assert exc.value.headers == {"Retry-After": "2"}
    assert retry_after(1000, 1.0) == 60 and retry_after(0.1, 50.0) == 1


def test_a_restarted_api_server_row_is_cleared_but_totals_stay() -> None:
    board = QueueBoard(2)
    board.row(1).sent(30)
    board.row(1).reserve(2)
    board.row(1).ended(30, prefilling=True)
    board.row(1).sent(30)
    board.clear(1)
    assert board.in_flight() == 0 and board.prefill_tokens() == 0
    assert board.drained() == (1, 0)


def _child_sends(board: QueueBoard) -> None:
    board.row(1).sent(7)


def test_rows_are_shared_with_spawned_processes() -> None:
    board = QueueBoard(2)
    proc = multiprocessing.get_context("spawn").Process(target=_child_sends, args=(board,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert board.in_flight() == 1 and board.prefill_tokens() == 7


def test_the_output_processor_keeps_its_row_true() -> None:
    """Sent -> first token (prefilled) -> finished; a choice that ends before its first token
    leaves the prefill backlog too; a re-sent choice is prefilled again."""
    tok = load_tokenizer(resolve_model_path(None))
    board = QueueBoard(1)
    row = board.row(0)

    async def run() -> None:
        proc = OutputProcessor(counts=row)
        stream = RequestStream("r", [[1, 2, 3]])
        params = SamplingParams()
        for i in range(3):
            detok = new_detokenizer(tok.backend_tokenizer, [1, 2, 3], params)
            proc.add(SeqState(f"r-{i}", i, 0, detok, stream, False, 3))
        assert board.in_flight() == 3 and board.prefill_tokens() == 9
        proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=[42])])
        assert board.prefill_tokens() == 6 and board.drained() == (0, 3)
        stop = FinishReason.STOP
        proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=[43], finish_reason=stop)])
        proc.forget(["r-1"])  # its client went away before its first token
        proc.forget(["r-1"])  # twice changes nothing
        assert board.in_flight() == 1 and board.prefill_tokens() == 3
        proc.process([EngineCoreOutput(request_id="r-2", new_token_ids=[44])])
        seq = proc.seqs["r-2"]
        proc.restart(seq, "r-2b", 0, new_detokenizer(tok.backend_tokenizer, [1, 2, 3], params))
        assert board.in_flight() == 1 and board.prefill_tokens() == 3
        proc.abort_all()
        assert board.in_flight() == 0 and board.prefill_tokens() == 0

    asyncio.run(run())
