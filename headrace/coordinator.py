"""The data-parallel coordinator: every engine's load, published to every API server, and the
door through which engines on other machines join.

Started by the launcher when there is more than one engine (or any on another machine).

1. Engines PUSH `EngineLoad` whenever their (waiting, running, KV usage) changes, and every
   heartbeat interval otherwise.
2. The coordinator PUBlishes the whole `LoadVector` at most every PUBLISH_INTERVAL_S while it
   changes, and every IDLE_PUBLISH_S regardless (so an API server that joined late, or missed a
   message, catches up).
3. An engine that reported once and then stays silent for LOST_AFTER_S is marked lost in the
   vector: the API servers then fail its requests and route around it. A report brings it back.
4. Headless nodes register on the registration socket (`--data-parallel-rpc-port`) with a
   `NodeHello`; a node of another wire version, another data-parallel size or ranks the head
   does not expect is refused with the reason. Accepted nodes get the endpoints their engines
   connect to, a heartbeat every second, and `NodeShutdown` when the head stops. A node that
   reports ranks out of restarts (`NodeRanksFailed`) has them marked failed in the vector.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType

import msgspec
import zmq

from headrace.process import die_with_parent, set_title, setup_logging
from headrace.wire.codec import Codec
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
from headrace.wire.sockets import Addresses

logger = logging.getLogger("headrace.coordinator")

PUBLISH_INTERVAL_S = 0.1
IDLE_PUBLISH_S = 2.0
LOST_AFTER_S = 3.0
NODE_HEARTBEAT_S = 1.0
_POLL_MS = 20


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """The topology: endpoints, the data-parallel size, and which ranks run on the head."""

    addresses: Addresses
    data_parallel_size: int
    local_ranks: tuple[int, ...]


def check_hello(hello: NodeHello, data_parallel_size: int, local_ranks: tuple[int, ...]) -> str:
    """Why a node may not join ('' if it may)."""
    if hello.version != WIRE_VERSION:
        return (
            f"this node speaks wire version {hello.version}, the head speaks {WIRE_VERSION}: "
            "run the same headrace version on every node"
        )
    if hello.data_parallel_size != data_parallel_size:
        return (
            f"this node says --data-parallel-size {hello.data_parallel_size}, "
            f"the head serves {data_parallel_size}"
        )
    ranks = range(hello.start_rank, hello.start_rank + hello.local_size)
    if hello.local_size < 1 or hello.start_rank < 0 or ranks.stop > data_parallel_size:
        return f"ranks {hello.start_rank}..{ranks.stop - 1} are outside 0..{data_parallel_size - 1}"
    taken = sorted(set(ranks) & set(local_ranks))
    if taken:
        return f"ranks {taken} run on the head itself"
    return ""


def run_coordinator(cfg: CoordinatorConfig) -> None:
    """Entry point of the coordinator process (spawned by the launcher)."""
    setup_logging()
    die_with_parent()
    set_title("Coordinator")
    coordinator = Coordinator(cfg)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    signal.signal(signal.SIGTERM, coordinator.request_stop)
    coordinator.run()


class Coordinator:
    """The load vector and the registered nodes; one loop over three sockets."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        m = cfg.data_parallel_size
        self.vector = LoadVector(
            seq=0,
            waiting=[0] * m,
            running=[0] * m,
            kv_cache_usage=[0.0] * m,
            lost=[False] * m,
            failed=[False] * m,
        )
        self.last_seen: list[float | None] = [None] * m
        self.nodes: dict[bytes, NodeHello] = {}
        self.stop = False
        addresses = cfg.addresses
        assert addresses.coordinator_input and addresses.coordinator_publish
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(addresses.bind(addresses.coordinator_input))
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(addresses.bind(addresses.coordinator_publish))
        self.registration: zmq.Socket | None = None
        if addresses.registration is not None:
            self.registration = self.ctx.socket(zmq.ROUTER)
            self.registration.bind(addresses.bind(addresses.registration))
            logger.info("waiting for headless nodes on %s", addresses.registration)
        self._load_codec = Codec(EngineLoad)
        self._node_codec: Codec[NodeHello | NodeRanksFailed] = Codec(NodeHello | NodeRanksFailed)  # type: ignore[arg-type]
        self._encoder = msgspec.msgpack.Encoder()

    def request_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stop = True

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        if self.registration is not None:
            poller.register(self.registration, zmq.POLLIN)
        dirty, last_publish, last_heartbeat = True, 0.0, 0.0
        while not self.stop:
            events = dict(poller.poll(_POLL_MS))
            now = time.monotonic()
            if self.pull in events:
                dirty |= self._take_loads(now)
            if self.registration is not None and self.registration in events:
                dirty |= self._take_node_messages()
            dirty |= self._mark_lost(now)
            if (dirty and now - last_publish >= PUBLISH_INTERVAL_S) or (
                now - last_publish >= IDLE_PUBLISH_S
            ):
                self.vector.seq += 1
                self.pub.send(self._encoder.encode(self.vector))
                dirty, last_publish = False, now
            if self.nodes and now - last_heartbeat >= NODE_HEARTBEAT_S:
                self._to_nodes(HeadHeartbeat())
                last_heartbeat = now
        if self.nodes:
            logger.info("stopping %d headless node(s)", len(self.nodes))
            self._to_nodes(NodeShutdown())
        self.ctx.destroy(linger=2000)

    def _take_loads(self, now: float) -> bool:
        changed = False
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return changed
            load = self._load_codec.decode(data)
            e, v = load.engine_index, self.vector
            if not 0 <= e < len(v.waiting):
                continue
            if v.lost[e]:
                logger.info("engine %d reports again", e)
            new = (load.num_waiting, load.num_running, load.kv_cache_usage, False)
            if new != (v.waiting[e], v.running[e], v.kv_cache_usage[e], v.lost[e]):
                v.waiting[e], v.running[e], v.kv_cache_usage[e], v.lost[e] = new
                changed = True
            self.last_seen[e] = now

    def _mark_lost(self, now: float) -> bool:
        changed = False
        v = self.vector
        for e, seen in enumerate(self.last_seen):
            if seen is not None and not v.lost[e] and now - seen > LOST_AFTER_S:
                logger.error("engine %d sent nothing for %.0f s: lost", e, now - seen)
                v.lost[e], v.waiting[e], v.running[e], v.kv_cache_usage[e] = True, 0, 0, 0.0
                changed = True
        return changed

    def _take_node_messages(self) -> bool:
        assert self.registration is not None
        changed = False
        while True:
            try:
                identity, data = self.registration.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return changed
            except ValueError:  # not two frames: not one of ours
                continue
            try:
                msg = self._node_codec.decode(data)
            except msgspec.DecodeError as exc:
                reason = f"the head could not read this node's hello ({exc}): versions differ?"
            else:
                if isinstance(msg, NodeRanksFailed):
                    changed |= self._ranks_failed(identity, msg)
                    continue
                hello = msg
                reason = check_hello(hello, self.cfg.data_parallel_size, self.cfg.local_ranks)
            if reason:
                logger.error("refused a headless node: %s", reason)
                self._send(identity, NodeRefused(reason=reason))
                continue
            for other, known in list(self.nodes.items()):  # a restarted node takes its ranks back
                if other != identity and known.start_rank == hello.start_rank:
                    del self.nodes[other]
            self.nodes[identity] = hello
            for rank in range(hello.start_rank, hello.start_rank + hello.local_size):
                changed |= self.vector.failed[rank]
                self.vector.failed[rank] = False
            last = hello.start_rank + hello.local_size - 1
            logger.info(
                "headless node %s joined with ranks %d..%d", hello.hostname, hello.start_rank, last
            )
            a = self.cfg.addresses
            assert a.coordinator_input is not None
            welcome = NodeWelcome(
                api_inputs=list(a.api_inputs),
                api_outputs=list(a.api_outputs),
                coordinator_input=a.coordinator_input,
            )
            self._send(identity, welcome)

    def _ranks_failed(self, identity: bytes, msg: NodeRanksFailed) -> bool:
        hello = self.nodes.get(identity)
        if hello is None:
            return False
        owned = range(hello.start_rank, hello.start_rank + hello.local_size)
        for rank in msg.ranks:
            if rank in owned:
                logger.error(
                    "rank %d on node %s failed for good: %s", rank, hello.hostname, msg.reason
                )
                self.vector.failed[rank] = True
        return True

    def _to_nodes(self, msg: HeadHeartbeat | NodeShutdown) -> None:
        for identity in list(self.nodes):
            self._send(identity, msg)

    def _send(self, identity: bytes, msg: msgspec.Struct) -> None:
        assert self.registration is not None
        try:
            self.registration.send_multipart([identity, self._encoder.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.nodes.pop(identity, None)  # gone (or not draining its queue): forget it
