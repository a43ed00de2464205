"""Scheduler and KV-cache accounting under a fake runner."""

from __future__ import annotations

import random

from headrace.engine.request import RequestStatus
from headrace.wire.messages import FinishReason
from tests.engine.factories import EOS, FakeRunner, make_request, make_scheduler, run_step


def _assert_no_leak(sched) -> None:
    assert not sched.running and not sched.waiting and not sched.requests
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert all(b.ref_count == 0 for b in sched.kv.blocks)


def test_budgets_respected_and_chunked_prefill() -> None:
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    runner = FakeRunner()
    reqs = [make_request([i + 1] * 25, max_tokens=5) for i in range(5)]  # no shared prefix
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished():
        run_step(sched, runner)
    for plan in runner.plans:
        assert plan.total_tokens <= 10
        assert len(plan.requests) <= 3
    # The 25-token prompts needed several chunks; decodes of earlier requests ran meanwhile.
    chunked = [p for p in runner.plans if any(n > 1 for n in p.num_new_tokens)]
    assert any(1 in p.num_new_tokens for p in chunked), "decodes must continue during a prefill"
    assert all(
        len(r.output_token_ids) == 5 and r.finish_reason is FinishReason.LENGTH for r in reqs
    )
    _assert_no_leak(sched)


def test_blocks_freed_on_finish_and_abort() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4)
    runner = FakeRunner()
    a, b = make_request(10, max_tokens=3), make_request(10, max_tokens=50)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, runner)
    assert sched.kv.num_free_blocks == 32 - 6
    while not a.is_finished:
        run_step(sched, runner)
    assert a.block_ids == [] and sched.kv.num_free_blocks == 32 - len(b.block_ids)
    out = sched.abort([b.request_id, "unknown"])
    assert [o.finish_reason for o in out] == [FinishReason.ABORT]
    _assert_no_leak(sched)


def test_abort_waiting_request() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request(8), make_request(8)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, FakeRunner())
    assert b.status is RequestStatus.WAITING
    sched.abort([b.request_id, a.request_id])
    _assert_no_leak(sched)


def test_prefix_cache_hits_counted_and_shared() -> None:
    sched = make_scheduler(block_size=4)
    runner = FakeRunner()
    shared = list(range(1, 13))  # three full blocks
    first = make_request([*shared, 50, 51])
    sched.add_request(first)
    run_step(sched, runner)
    sched.stats()
    second = make_request([*shared, 60])
    sched.add_request(second)
    run_step(sched, runner)
    stats = sched.stats()
    assert second.num_cached_tokens == 12
    assert stats.prefix_cache_hits == 12 and stats.prefix_cache_queries == 13
    assert second.block_ids[:3] == first.block_ids[:3]
    assert all(sched.kv.blocks[b].ref_count == 2 for b in first.block_ids[:3])
    while sched.has_unfinished():
        run_step(sched, runner)
    _assert_no_leak(sched)
    # The freed prefix stays cached: a third request still hits it.
    third = make_request([*shared, 70])
    sched.add_request(third)
    run_step(sched, runner)
    assert third.num_cached_tokens == 12


def test_fully_cached_prompt_still_computes_last_token() -> None:
    sched = make_scheduler(block_size=4)
    runner = FakeRunner()
    prompt = list(range(1, 9))  # exactly two blocks
    for _ in range(2):
        r = make_request(prompt, max_tokens=1)
        sched.add_request(r)
        while sched.has_unfinished():
            run_step(sched, runner)
    assert r.num_cached_tokens == 4  # one block left to compute so the step can sample
    assert r.output_token_ids


def test_lru_evicts_least_recent_cached_block() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=1)
    runner = FakeRunner()
    for prompt in ([1, 2, 3, 4, 5], [9, 9, 9, 9, 9]):
        r = make_request(prompt, max_tokens=1)
        sched.add_request(r)
        while sched.has_unfinished():
            run_step(sched, runner)
    assert len(sched.kv.cached) == 2
    big = make_request(list(range(20, 32)), max_tokens=1)  # needs 3 blocks + cached ones evicted
    sched.add_request(big)
    run_step(sched, runner)
    survivors = set(sched.kv.cached)
    again = make_request([9, 9, 9, 9, 8], max_tokens=1)
    hashes = sched.kv._block_hashes(again, 1)
    assert hashes[0] in survivors  # the more recently freed prefix survived


def test_preemption_when_blocks_run_out() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner()
    reqs = [make_request([i + 1] * 6, max_tokens=10) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    preempted = 0
    while sched.has_unfinished():
        run_step(sched, runner)
        preempted += sched.stats().num_preemptions
    assert preempted > 0
    assert any(r.num_preemptions for r in reqs)
    for r in reqs:  # recompute changes nothing: same tokens as an unpreempted run would give
        assert r.output_token_ids == [100 + 6 + i for i in range(10)]
        assert r.num_computed_tokens == 15  # the last sampled token is never computed
    _assert_no_leak(sched)


def test_eos_stop_tokens_and_min_tokens() -> None:
    sched = make_scheduler()

    class Fixed:
        def execute(self, plan):
            from headrace.engine.scheduler import RunnerOutput

            return RunnerOutput({r.request_id: EOS for r in plan.requests})

    a = make_request(4, max_tokens=5)
    b = make_request(4, max_tokens=5, ignore_eos=True)
    c = make_request(4, max_tokens=5, min_tokens=3)
    for r in (a, b, c):
        sched.add_request(r)
    while sched.has_unfinished():
        plan = sched.schedule()
        sched.update(plan, Fixed().execute(plan))
    assert len(a.output_token_ids) == 1 and a.finish_reason is FinishReason.STOP
    assert len(b.output_token_ids) == 5 and b.finish_reason is FinishReason.LENGTH
    assert len(c.output_token_ids) == 3 and c.finish_reason is FinishReason.STOP


def test_random_add_abort_finish_never_leaks() -> None:
    rng = random.Random(1234)
    sched = make_scheduler(num_blocks=48, block_size=4, max_num_seqs=6, max_num_batched_tokens=24)
    runner = FakeRunner(eos_rate=0.05, seed=7)
    live: list[str] = []
    shared = [rng.randrange(1, 50) for _ in range(8)]
    for _ in range(1000):
        action = rng.random()
        if action < 0.3:
            prefix = shared if rng.random() < 0.5 else []
            prompt = prefix + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))]
            r = make_request(prompt, max_tokens=rng.randrange(1, 20))
            sched.add_request(r)
            live.append(r.request_id)
        elif action < 0.4 and live:
            sched.abort([live.pop(rng.randrange(len(live)))])
        for out in run_step(sched, runner):
            if out.finish_reason is not None and out.request_id in live:
                live.remove(out.request_id)
        in_use = {b for r in sched.running for b in r.block_ids}
        refs = sum(b.ref_count for b in sched.kv.blocks)
        assert refs == sum(len(r.block_ids) for r in sched.running)
        assert sched.kv.num_free_blocks == sched.kv.num_blocks - len(in_use)
        assert all(not r.block_ids for r in sched.waiting)
    sched.abort(list(live))
    _assert_no_leak(sched)
    assert EOS == 0
