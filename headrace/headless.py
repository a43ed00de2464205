"""`headrace serve --headless`: a node that runs engines for a head on another machine.

1. Register with the head's coordinator at `--data-parallel-address:--data-parallel-rpc-port`
   (`NodeHello`; it waits for a head that is not up yet). Refused: exit 1 with the reason.
2. Keep this node's engines running (`supervise.EngineKeeper`, the head's restart rules),
   pointed at the endpoints of the head's `NodeWelcome`; a rank out of restarts is reported to
   the head (`NodeRanksFailed`), which then reports failed.
3. Stop on the head's `NodeShutdown` or a signal (exit 0), or when the head has been silent
   for HEAD_LOST_S (exit 1).
"""

from __future__ import annotations

import logging
import signal
import socket
import time

import zmq

from headrace.launch import (
    ENGINE_GRACE_S,
    LaunchConfig,
    engine_spawn,
    settle_child_environment,
    stop_resource_tracker,
)
from headrace.supervise import EngineBoard, EngineKeeper
from headrace.wire.codec import Codec
from headrace.wire.messages import (
    WIRE_VERSION,
    HeadHeartbeat,
    HeadMessage,
    NodeHello,
    NodeRanksFailed,
    NodeRefused,
    NodeShutdown,
    NodeWelcome,
)
from headrace.wire.sockets import Addresses

logger = logging.getLogger("headrace.launch")

HEAD_LOST_S = 10.0
_WAITING_LOG_S = 10.0


def run_headless(cfg: LaunchConfig) -> int:
    """The node's one loop; returns the exit code."""
    par = cfg.parallel
    head = f"tcp://{par.data_parallel_address}:{par.data_parallel_rpc_port}"
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _f: stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _f: stop.append(signum))
    settle_child_environment()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 1000)
    dealer.connect(head)
    codec: Codec[HeadMessage] = Codec(HeadMessage)  # type: ignore[arg-type]
    hello = NodeHello(
        version=WIRE_VERSION,
        data_parallel_size=par.data_parallel_size,
        start_rank=par.data_parallel_start_rank,
        local_size=par.local_size,
        hostname=socket.gethostname(),
    )
    dealer.send(codec.encode(hello))
    last = par.data_parallel_start_rank + par.local_size - 1
    logger.info("joining the head at %s with ranks %d..%d", head, hello.start_rank, last)
    keeper: EngineKeeper | None = None
    heard = waiting_since = time.monotonic()
    try:
        while not stop:
            if dealer.poll(250):
                msg = codec.decode(dealer.recv())
                heard = time.monotonic()
                if isinstance(msg, NodeRefused):
                    logger.error("the head refused this node: %s", msg.reason)
                    return 1
                if isinstance(msg, NodeShutdown):
                    logger.info("the head is stopping; stopping this node's engines")
                    return 0
                if isinstance(msg, NodeWelcome) and keeper is None:
                    keeper = _start(cfg, msg)
                elif not isinstance(msg, HeadHeartbeat | NodeWelcome):
                    logger.warning("unexpected message from the head: %r", msg)
            now = time.monotonic()
            if keeper is None:
                if now - waiting_since >= _WAITING_LOG_S:
                    logger.info("still waiting for the head at %s", head)
                    waiting_since = now
                continue
            if now - heard > HEAD_LOST_S:
                logger.error("no word from the head for %.0f s; stopping", now - heard)
                return 1
            failed = keeper.tick(now)
            if failed:
                report = NodeRanksFailed(ranks=failed, reason="out of restarts")
                dealer.send(codec.encode(report))
        logger.info("received %s: stopping", signal.Signals(stop[0]).name)
        return 0
    finally:
        if keeper is not None:
            keeper.stop(ENGINE_GRACE_S)
        ctx.destroy(linger=1000)
        stop_resource_tracker()


def _start(cfg: LaunchConfig, welcome: NodeWelcome) -> EngineKeeper:
    addresses = Addresses(
        tuple(welcome.api_inputs), tuple(welcome.api_outputs), welcome.coordinator_input
    )
    ranks = cfg.parallel.local_ranks
    board = EngineBoard(cfg.parallel.data_parallel_size)  # this node's own; nobody else reads it
    keeper = EngineKeeper(engine_spawn(cfg, addresses), ranks, board, cfg.max_restarts)
    keeper.start_all()
    logger.info("joined: %d engine(s) starting", len(ranks))
    return keeper
