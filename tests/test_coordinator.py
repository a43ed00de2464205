"""The coordinator over real ZMQ sockets (in a thread): publication cadence, lost engines,
and the handshake of headless nodes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq

from headrace import coordinator as coord_mod
from headrace.config import EngineConfig, ParallelConfig, ServerConfig
from headrace.coordinator import Coordinator, CoordinatorConfig, check_hello
from headrace.launch import LaunchConfig, engine_spawn
from headrace.wire.messages import (
    WIRE_VERSION,
    EngineLoad,
    HeadHeartbeat,
    LoadVector,
    NodeHello,
    NodeRanksFailed,
    NodeRefused,
    NodeShutdown,
    NodeWelcome,
)
from headrace.wire.sockets import Addresses, free_ports


def hello(**kw: int) -> NodeHello:
    fields = {"version": WIRE_VERSION, "data_parallel_size": 4, "start_rank": 2, "local_size": 2}
    return NodeHello(**{**fields, **kw})  # type: ignore[arg-type]


def test_check_hello() -> None:
    assert check_hello(hello(), 4, (0, 1)) == ""
    assert "wire version" in check_hello(hello(version=WIRE_VERSION + 1), 4, (0, 1))
    assert "--data-parallel-size 3" in check_hello(hello(data_parallel_size=3), 4, (0, 1))
    assert "outside 0..3" in check_hello(hello(start_rank=3), 4, (0, 1))
    assert "on the head itself" in check_hello(hello(start_rank=1), 4, (0, 1))


def test_engines_of_one_machine_share_its_cores_and_memory(monkeypatch) -> None:
    """Two local engines of four: each gets half the threads, and its loader half the memory."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    parallel = ParallelConfig(data_parallel_size=4, data_parallel_size_local=2)
    spawn = engine_spawn(LaunchConfig(ServerConfig(), EngineConfig(), parallel), Addresses((), ()))
    assert spawn.engine.model.engines_per_machine == 2
    assert spawn.num_threads == max(1, len(os.sched_getaffinity(0)) // 2)
    one = engine_spawn(LaunchConfig(ServerConfig(), EngineConfig()), Addresses((), ()))
    assert one.engine.model.engines_per_machine == 1 and one.num_threads == 0


def test_parallel_config_checks_the_topology() -> None:
    head = ParallelConfig(data_parallel_size=4, data_parallel_size_local=2)
    assert head.local_ranks == (0, 1) and head.multi_node and head.needs_coordinator
    node = ParallelConfig(
        data_parallel_size=4, data_parallel_size_local=2, data_parallel_start_rank=2, headless=True
    )
    assert node.local_ranks == (2, 3)
    assert not ParallelConfig(data_parallel_size=1).needs_coordinator
    one_box = ParallelConfig(data_parallel_size=2)
    assert one_box.needs_coordinator and not one_box.multi_node
    for bad in (
        {"data_parallel_size": 2, "data_parallel_size_local": 3},
        {"data_parallel_size": 2, "data_parallel_start_rank": 1},  # not headless
        {"data_parallel_size": 2, "headless": True},  # headless needs a start rank
        {"api_server_count": 0},
    ):
        with pytest.raises(ValueError):
            ParallelConfig(**bad)  # type: ignore[arg-type]


@pytest.fixture
def running() -> Iterator[tuple[Coordinator, Addresses, zmq.Context]]:
    rpc = free_ports("127.0.0.1", 1)[0]
    addresses = Addresses.tcp("127.0.0.1", rpc, num_api_servers=1)
    coordinator = Coordinator(CoordinatorConfig(addresses, 3, (0,)))
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    ctx = zmq.Context()
    try:
        yield coordinator, addresses, ctx
    finally:
        coordinator.stop = True
        thread.join(5)
        ctx.destroy(linger=0)


def poll_until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.02)


def vectors(sub: zmq.Socket, seconds: float) -> list[tuple[float, LoadVector]]:
    out = []
    decoder = msgspec.msgpack.Decoder(LoadVector)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000)):
            out.append((time.monotonic(), decoder.decode(sub.recv())))
    return out


def test_loads_are_published_within_100_ms_and_lost_engines_marked(
    running: tuple[Coordinator, Addresses, zmq.Context], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, addresses, ctx = running
    monkeypatch.setattr(coord_mod, "LOST_AFTER_S", 0.6)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert addresses.coordinator_publish and addresses.coordinator_input
    sub.connect(addresses.coordinator_publish)
    push = ctx.socket(zmq.PUSH)
    push.connect(addresses.coordinator_input)
    vectors(sub, 0.3)  # joined
    encoder = msgspec.msgpack.Encoder()
    sent = time.monotonic()
    for waiting in range(1, 11):  # a burst of changes: at most one publication per 100 ms
        load = EngineLoad(engine_index=1, num_waiting=waiting, num_running=2, kv_cache_usage=0.5)
        push.send(encoder.encode(load))
        time.sleep(0.01)
    got = vectors(sub, 0.5)
    assert got, "nothing published"
    first_at = got[0][0]
    assert first_at - sent < 0.25
    assert len(got) <= 3  # ten changes over ~0.1 s
    last = got[-1][1]
    assert (last.waiting, last.running, last.lost) == ([0, 10, 0], [0, 2, 0], [False] * 3)
    # engine 1 now goes silent: marked lost, its load cleared
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        lost = [v for _, v in vectors(sub, 0.2) if v.lost[1]]
        if lost:
            assert lost[0].waiting[1] == 0 and lost[0].lost == [False, True, False]
            break
    else:
        pytest.fail("engine 1 was never marked lost")
    # a report brings it back
    load = EngineLoad(engine_index=1, num_waiting=0, num_running=1, kv_cache_usage=0.1)
    push.send(encoder.encode(load))
    assert any(not v.lost[1] and v.running[1] == 1 for _, v in vectors(sub, 0.4))


def test_nodes_are_welcomed_refused_heartbeated_and_stopped(
    running: tuple[Coordinator, Addresses, zmq.Context],
) -> None:
    coordinator, addresses, ctx = running
    assert addresses.registration is not None
    decoder = msgspec.msgpack.Decoder(NodeWelcome | NodeRefused | HeadHeartbeat | NodeShutdown)

    def node(msg: NodeHello) -> zmq.Socket:
        dealer = ctx.socket(zmq.DEALER)
        assert addresses.registration is not None
        dealer.connect(addresses.registration)
        dealer.send(msgspec.msgpack.encode(msg))
        return dealer

    def reply(dealer: zmq.Socket) -> object:
        assert dealer.poll(3000), "no reply from the head"
        return decoder.decode(dealer.recv())

    bad = reply(node(hello(version=WIRE_VERSION + 7, data_parallel_size=3, start_rank=1)))
    assert isinstance(bad, NodeRefused) and "wire version" in bad.reason
    good = node(hello(data_parallel_size=3, start_rank=1))
    welcome = reply(good)
    assert isinstance(welcome, NodeWelcome)
    assert welcome.api_inputs == list(addresses.api_inputs)
    assert welcome.coordinator_input == addresses.coordinator_input
    assert isinstance(reply(good), HeadHeartbeat)
    # the node (ranks 1..2) gives up on rank 0, the head's, and rank 2, its own
    good.send(msgspec.msgpack.encode(NodeRanksFailed(ranks=[0, 2], reason="out of restarts")))
    poll_until(lambda: coordinator.vector.failed == [False, False, True])
    coordinator.stop = True
    while isinstance(msg := reply(good), HeadHeartbeat):
        pass
    assert isinstance(msg, NodeShutdown)
