"""OutputProcessor with a real tokenizer and a recording observer (no engine, no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

from headrace.frontend.output import (
    EngineError,
    OutputProcessor,
    RequestStream,
    SeqState,
    new_detokenizer,
)
from headrace.model.loader import load_tokenizer, resolve_model_path
from headrace.wire.messages import EngineCoreOutput, FinishReason, RequestTimes, SamplingParams


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def first_token(self, seq: SeqState, ttft: float) -> None:
        self.events.append(("first", seq.request_id))

    def next_token(self, seq: SeqState, gap: float) -> None:
        self.events.append(("next", seq.request_id))

    def generated(self, engine_index: int, num_tokens: int) -> None:
        self.events.append(("generated", num_tokens))

    def finished(self, seq: SeqState, reason: str, now: float) -> None:
        self.events.append(("finished", reason))

    def engine_times(self, seq: SeqState, times: RequestTimes) -> None:
        self.events.append(("times", times.first_token))

    def recovery(self, engine_index: int, resent: bool) -> None:
        self.events.append(("resent" if resent else "lost", engine_index))


def test_stop_string_ends_the_choice_and_late_engine_times_are_kept() -> None:
    tok = load_tokenizer(resolve_model_path(None))
    ids = tok(" hello world and more", add_special_tokens=False).input_ids

    async def run() -> tuple[list[Any], list[list[str]], Recorder]:
        rec = Recorder()
        proc = OutputProcessor(rec)
        stream = RequestStream("r", [[1, 2, 3]])
        params = SamplingParams(stop=["wor"])
        detok = new_detokenizer(tok.backend_tokenizer, [1, 2, 3], params)
        proc.add(SeqState("r-0", 0, 0, detok, stream, False, 3))
        aborts = [
            proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=[t])]) for t in ids
        ]
        times = RequestTimes(queued=0.0, scheduled=1.0, first_token=2.0, last_token=3.0)
        proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=[],
                                       finish_reason=FinishReason.ABORT, times=times)])  # fmt: skip
        deltas = [d async for d in stream]
        return deltas, aborts, rec

    deltas, aborts, rec = asyncio.run(run())
    assert "".join(d.text for d in deltas) == " hello "
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "wor"
    assert [a for a in aborts if a] == [["r-0"]]  # abort sent once, when the stop string matched
    # generation tokens count as they arrive, up to the one that completed the stop string
    counted = [n for kind, n in rec.events if kind == "generated"]
    assert counted == [1] * (next(i for i, a in enumerate(aborts) if a) + 1)
    assert rec.events[0] == ("first", "r-0")
    assert ("finished", "stop") in rec.events and rec.events[-1] == ("times", 2.0)


def test_a_restarted_choice_starts_over_and_a_lost_one_ends_with_a_retryable_error() -> None:
    """What EngineClient._rescue does with the choices of a lost engine."""
    tok = load_tokenizer(resolve_model_path(None))
    ids = tok(" once upon a time", add_special_tokens=False).input_ids
    params = SamplingParams()

    async def run() -> tuple[list[Any], BaseException | None, Recorder, OutputProcessor]:
        rec = Recorder()
        proc = OutputProcessor(rec)
        stream = RequestStream("r", [[1, 2, 3]], streaming=False)
        detok = new_detokenizer(tok.backend_tokenizer, [1, 2, 3], params)
        proc.add(keep := SeqState("r-0", 0, 0, detok, stream, False, 3))
        other = RequestStream("s", [[1, 2, 3]])
        proc.add(lose := SeqState("s-0", 0, 0, detok, other, False, 3))
        proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=ids[:2])])
        assert {s.request_id for s in proc.on_engine(0)} == {"r-0", "s-0"}
        fresh = new_detokenizer(tok.backend_tokenizer, [1, 2, 3], params)
        proc.restart(keep, "r-0-resent", 1, fresh)
        proc.lose(lose, EngineError("engine failed: gone", retryable=True))
        assert proc.num_in_flight(1) == 1 and proc.num_in_flight(0) == 0
        proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=[5])])  # old id: ignored
        proc.process([EngineCoreOutput(request_id="r-0-resent", new_token_ids=ids,
                                       finish_reason=FinishReason.LENGTH)])  # fmt: skip
        deltas = [d async for d in stream]
        error = None
        try:
            _ = [d async for d in other]
        except EngineError as exc:
            error = exc
        return deltas, error, rec, proc

    deltas, error, rec, proc = asyncio.run(run())
    restart = [i for i, d in enumerate(deltas) if d.restart]
    assert len(restart) == 1  # what came before it is to be dropped
    after = deltas[restart[0] + 1 :]
    assert "".join(d.text for d in after) == " once upon a time"
    assert sum(len(d.token_ids) for d in after) == len(ids)
    assert isinstance(error, EngineError) and error.retryable
    assert ("resent", 1) in rec.events and ("lost", 0) in rec.events
    assert not proc.seqs


def test_tokens_of_a_partial_character_are_counted_in_the_next_delta() -> None:
    """An emoji takes several byte tokens; those that make no text yet ride with the next delta,
    so a client summing the deltas' tokens (usage) counts every generated token."""
    tok = load_tokenizer(resolve_model_path(None))
    ids = tok(" ok 😀 你好", add_special_tokens=False).input_ids
    assert len(ids) > len(["ok", "😀", "你好"])  # multi-token characters in there

    async def run(finish_early: bool) -> list[Any]:
        proc = OutputProcessor(Recorder())
        stream = RequestStream("r", [[1, 2, 3]])
        detok = new_detokenizer(tok.backend_tokenizer, [1, 2, 3], SamplingParams())
        proc.add(SeqState("r-0", 0, 0, detok, stream, False, 3))
        feed = ids[:-1] if finish_early else ids
        for i, t in enumerate(feed):
            last = i == len(feed) - 1 and not finish_early
            reason = FinishReason.LENGTH if last else None
            proc.process([EngineCoreOutput(request_id="r-0", new_token_ids=[t],
                                           finish_reason=reason)])  # fmt: skip
        if finish_early:
            proc.abort_all()
        return [d async for d in stream]

    deltas = asyncio.run(run(finish_early=False))
    assert sum(len(d.token_ids) for d in deltas) == len(ids)
    assert "".join(d.text for d in deltas) == " ok 😀 你好"
    assert len(deltas) < len(ids)  # some tokens made no text on their own
    aborted = asyncio.run(run(finish_early=True))
    assert sum(len(d.token_ids) for d in aborted) == len(ids) - 1
