"""The routing score, with fake load vectors (no processes)."""

from __future__ import annotations

import pytest

from headrace.frontend.load_balance import LoadBalancer, NoEngineError


def route(lb: LoadBalancer, in_flight: list[int], count: int) -> list[int]:
    """`count` picks by one server, its in-flight counts growing as it sends."""
    picks = []
    for _ in range(count):
        e = lb.pick([True] * len(in_flight), in_flight)
        in_flight[e] += 1
        picks.append(e)
    return picks


def test_score_is_vllms_formula() -> None:
    lb = LoadBalancer(2, num_api_servers=3)
    lb.publish(waiting=[4, 0], running=[2, 0], kv_usage=[0.75, 0.0])
    # max(3 x 1, 4 + 2) + 6 x 4 x (0.75 - 0.5) = 6 + 6
    assert lb.score(0, in_flight_here=1) == pytest.approx(12.0)
    # this server's own requests dominate when the vector says less: max(3 x 5, 0)
    assert lb.score(1, in_flight_here=5) == pytest.approx(15.0)


def test_kv_pressure_steers_away_from_a_full_cache() -> None:
    lb = LoadBalancer(2)
    lb.publish(waiting=[3, 3], running=[10, 12], kv_usage=[0.95, 0.2])
    # engine 0 has fewer requests but its queue waits on a nearly full cache
    assert lb.pick([True, True], [0, 0]) == 1


def test_least_loaded_wins_and_sends_count_until_the_next_publication() -> None:
    lb = LoadBalancer(3)
    lb.publish(waiting=[0, 0, 0], running=[5, 1, 3], kv_usage=[0.1, 0.1, 0.1])
    picks = [lb.pick([True] * 3, [0, 0, 0]) for _ in range(3)]
    # engine 1 until what was sent there since the vector (2) ties it with engine 2 (3)
    assert picks == [1, 1, 2]
    assert lb.loads[1].sent_since_publication == 2
    lb.publish(waiting=[0, 0, 0], running=[5, 4, 3], kv_usage=[0.1, 0.1, 0.1])
    assert lb.loads[1].sent_since_publication == 0
    assert lb.pick([True] * 3, [0, 0, 0]) == 2


def test_ties_rotate_instead_of_piling_on_the_first_engine() -> None:
    lb = LoadBalancer(4)
    picks = [lb.pick([True] * 4, [0] * 4) for _ in range(4)]
    lb.publish([0] * 4, [0] * 4, [0.0] * 4)
    picks += [lb.pick([True] * 4, [0] * 4) for _ in range(4)]
    assert sorted(picks) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_two_servers_bursting_on_a_stale_vector_do_not_herd() -> None:
    """Both see the same (stale, all-idle) vector and 20 requests each at once."""
    servers = [LoadBalancer(2, num_api_servers=2, api_index=i) for i in range(2)]
    for lb in servers:
        lb.publish([0, 0], [0, 0], [0.0, 0.0])
    totals = [0, 0]
    for lb in servers:
        for e in route(lb, [0, 0], 20):
            totals[e] += 1
    assert totals == [20, 20]


def test_two_servers_bursting_on_an_uneven_vector_fill_the_idle_engine_first() -> None:
    servers = [LoadBalancer(3, num_api_servers=2, api_index=i) for i in range(2)]
    for lb in servers:
        lb.publish(waiting=[0, 0, 0], running=[8, 0, 0], kv_usage=[0.3, 0.0, 0.0])
    totals = [0, 0, 0]
    for lb in servers:
        for e in route(lb, [0, 0, 0], 12):
            totals[e] += 1
    assert totals[0] < totals[1] and totals[0] < totals[2]
    assert abs(totals[1] - totals[2]) <= 2
    assert sum(totals) == 24


def test_dead_engines_are_skipped_and_none_live_is_an_error() -> None:
    lb = LoadBalancer(3)
    lb.publish(waiting=[0, 9, 0], running=[0, 9, 0], kv_usage=[0.0, 0.0, 0.0])
    assert {lb.pick([False, True, False], [0, 0, 0]) for _ in range(5)} == {1}
    with pytest.raises(NoEngineError):
        lb.pick([False, False, False], [0, 0, 0])


def test_pinned_requests_go_to_their_rank_or_fail() -> None:
    lb = LoadBalancer(2)
    lb.publish(waiting=[0, 50], running=[0, 50], kv_usage=[0.0, 0.99])
    assert [lb.pick([True, True], [0, 0], pinned=1) for _ in range(3)] == [1, 1, 1]
    assert lb.loads[1].sent_since_publication == 3
    with pytest.raises(NoEngineError, match="rank 1"):
        lb.pick([True, False], [0, 0], pinned=1)
