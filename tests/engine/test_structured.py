"""Constrained decoding in the engine: the scheduler waits for grammars, the runner masks logits,
and the offline LLM takes `SamplingParams(structured_outputs=...)`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from headrace.engine.structured import GrammarState, choice_grammar
from headrace.offline import LLM
from headrace.wire.messages import FinishReason, SamplingParams, StructuredOutputsParams
from tests.engine.factories import FakeRunner, make_request, make_scheduler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


class _Compiling(GrammarState):
    """A grammar whose compile has not finished until the test resolves its future."""

    def __init__(self) -> None:
        super().__init__(Future())


def test_a_compiling_grammar_waits_without_blocking_the_line() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    slow = make_request(4)
    slow.grammar = _Compiling()
    plain = make_request(4)
    sched.add_request(slow)
    sched.add_request(plain)
    plan = sched.schedule()
    assert [r.request_id for r in plan.requests] == [plain.request_id]
    assert list(sched.waiting) == [slow]  # still first in line for when it compiles
    sched.update(plan, runner.execute(plan))
    assert not sched.blocked_on_grammars()  # `plain` runs
    sched.abort([plain.request_id])
    assert sched.blocked_on_grammars()
    assert sched.schedule().is_empty


def test_a_grammar_that_failed_ends_its_request_with_an_error() -> None:
    sched = make_scheduler()
    bad = make_request(4)
    state = _Compiling()
    state.future.set_exception(ValueError("no such rule"))
    bad.grammar = state
    sched.add_request(bad)
    plan = sched.schedule()
    assert plan.is_empty
    [out] = plan.failed
    assert out.finish_reason is FinishReason.ERROR
    assert "no such rule" in str(out.stop_reason)
    assert not sched.has_unfinished()


def test_choice_grammar_escapes_quotes() -> None:
    assert choice_grammar(['say "hi"', "a\\b"]) == r'root ::= "say \"hi\"" | "a\\b"'


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    yield LLM(max_model_len=512)


def _one(llm: LLM, prompt: str, spec: StructuredOutputsParams, **kw: Any) -> Any:
    kw.setdefault("temperature", 1.0)
    kw.setdefault("max_tokens", 120)
    params = SamplingParams(structured_outputs=spec, **kw)
    return llm.chat([{"role": "user", "content": prompt}], params)[0].outputs[0]


def test_json_schema_holds_at_temperature_one(llm: LLM) -> None:
    spec = StructuredOutputsParams(json=PERSON)
    for seed in range(3):
        out = _one(llm, "Describe a person as JSON.", spec, seed=seed)
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)


def test_choice_regex_and_grammar(llm: LLM) -> None:
    out = _one(llm, "Pick a color.", StructuredOutputsParams(choice=["red", "green", "blue"]))
    assert out.text in ("red", "green", "blue")
    out = _one(llm, "A phone number?", StructuredOutputsParams(regex=r"\d{3}-\d{4}"), seed=1)
    assert re.fullmatch(r"\d{3}-\d{4}", out.text)
    ebnf = 'root ::= "(" num " + " num ")"\nnum ::= [1-9] [0-9]?'
    out = _one(llm, "An addition?", StructuredOutputsParams(grammar=ebnf), seed=2)
    assert re.fullmatch(r"\([1-9][0-9]? \+ [1-9][0-9]?\)", out.text), out.text


def test_max_tokens_cuts_json_with_finish_reason_length(llm: LLM) -> None:
    out = _one(llm, "Describe a person.", StructuredOutputsParams(json=PERSON), max_tokens=5)
    assert out.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_compiled_grammars_are_cached_by_constraint(llm: LLM) -> None:
    grammars = llm.engine.runner.grammars
    first = grammars.attach(StructuredOutputsParams(json=PERSON))
    again = grammars.attach(StructuredOutputsParams(json=json.dumps(PERSON)))
    assert first.future is again.future
    other = grammars.attach(StructuredOutputsParams(regex="[a-z]+"))
    assert other.future is not first.future


def test_constrained_and_free_requests_share_a_batch(llm: LLM) -> None:
    """A free greedy request in the same batch as constrained ones says what it says alone."""
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    alone = llm.chat(conv, greedy)[0].outputs[0].text
    constrained = SamplingParams(
        temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputsParams(json_object=True)
    )
    outs = llm.chat([conv, conv, conv], [constrained, greedy, constrained])
    assert outs[1].outputs[0].text == alone
    assert outs[0].outputs[0].text.startswith("{")


def test_chat_renders_tools_with_a_given_template(llm: LLM) -> None:
    template = Path(__file__).parents[2] / "examples" / "tool_chat_template_smollm2_hermes.jinja"
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    [out] = llm.chat(
        [{"role": "user", "content": "What's the weather in Tokyo?"}],
        SamplingParams(temperature=0.0, max_tokens=40),
        chat_template=template.read_text(),
        tools=[weather],
    )
    text = out.outputs[0].text
    assert text.startswith("<tool_call>"), text
    call = json.loads(text.removeprefix("<tool_call>").split("</tool_call>")[0])
    assert call == {"name": "get_weather", "arguments": {"city": "Tokyo"}}


def test_torch_bitmask_apply_equals_xgrammars() -> None:
    """apply_bitmask (accelerators, where xgrammar's kernels would need triton) masks exactly
    what xgrammar's CPU kernel masks, in the rows named, at a vocabulary that ends mid-word."""
    from headrace.engine.structured import apply_bitmask, import_xgrammar

    xgr = import_xgrammar()
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 100, [0, 2, 3]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, (vocab + 31) // 32), generator=gen)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(4, vocab, generator=gen)
    want, got = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, indices=rows)
    apply_bitmask(got, bitmask, rows)
    assert torch.equal(got, want)
    assert 0 < int(got[rows].isinf().sum()) < len(rows) * vocab
    assert torch.equal(got[1], logits[1])  # rows not named are untouched
