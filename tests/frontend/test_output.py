"""OutputProcessor with a real tokenizer and a recording observer (no engine, no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

from headrace.frontend.output import OutputProcessor, RequestStream, SeqState, new_detokenizer
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
