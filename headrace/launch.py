"""`headrace serve`: bind the port, spawn the coordinator, engines and API servers, supervise
them, stop them; and `headrace serve --headless`, a node that only runs engines for a head.

Head (`Launcher.run`):
1. Bind the listening socket at once (clients and probes connect from the first second; API
   servers inherit it, so N servers share one port).
2. With several engines, spawn the coordinator (load vector; registration of headless nodes);
   then one engine-core process per local data-parallel rank, then the API servers (they show
   `loading` until every rank, local or remote, sends READY).
3. Watch every child: an API server or the coordinator that exits stops everything (exit 1); an
   engine that exits is reported by the API servers (failed), and the launcher keeps serving
   that state until stopped.
4. SIGINT / SIGTERM: SIGTERM to the API servers (they finish in-flight work on every rank), then
   to the engines, then to the coordinator, which tells headless nodes to stop. Anything still
   alive after its grace period is killed. Exit 0.

Headless node (`run_headless`): register with the head's coordinator (refused: exit 1 with the
reason), spawn this node's engines pointed at the head's endpoints, and supervise them until the
head says stop (exit 0), a signal arrives (exit 0), or the head goes silent (exit 1).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from headrace.config import EngineConfig, ParallelConfig, ServerConfig
from headrace.wire.sockets import Addresses

logger = logging.getLogger("headrace.launch")

_ENGINE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    server: ServerConfig
    engine: EngineConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    shutdown_timeout: float = 30.0
    load_delay_s: float = 0.0


def bind_socket(host: str | None, port: int) -> socket.socket:
    """Listen on (host, port); no host = every interface (IPv6 dual-stack when available)."""
    if host in (None, "", "0.0.0.0", "::"):
        family = (
            socket.AF_INET6 if socket.has_dualstack_ipv6() and host != "0.0.0.0" else socket.AF_INET
        )
        addr = ("::" if family == socket.AF_INET6 else "0.0.0.0", port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        family, addr = info[0], (str(info[4][0]), int(info[4][1]))
    # proto given explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says IPPROTO_TCP, and without it small responses wait ~40 ms (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Launcher:
    """Owns the child processes of one `headrace serve`."""

    def __init__(self, cfg: LaunchConfig) -> None:
        self.cfg = cfg
        self.stop_requested = False
        self.engines: list[BaseProcess] = []
        self.api_servers: list[BaseProcess] = []
        self.coordinator: list[BaseProcess] = []  # zero or one

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Forward at once, so readiness turns red now; a second signal is forwarded too (API
        servers then stop without waiting for in-flight requests)."""
        if not self.stop_requested:
            logger.info("received %s: draining", signal.Signals(signum).name)
        self.stop_requested = True
        for proc in self.api_servers:
            if proc.is_alive():
                proc.terminate()

    def run(self) -> int:
        server, par = self.cfg.server, self.cfg.parallel
        sock = bind_socket(server.host, server.port)  # first: clients may connect from now on
        logger.info("listening on %s:%d", server.host or "*", server.port)
        from headrace.api.app import ApiServerArgs, run_api_server
        from headrace.coordinator import CoordinatorConfig, run_coordinator

        if par.multi_node:
            addresses = Addresses.tcp(
                par.data_parallel_address, par.data_parallel_rpc_port, par.api_server_count
            )
        else:
            addresses = Addresses.local(par.api_server_count, par.needs_coordinator)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        _settle_child_environment()
        # API servers share their metrics through files here (prometheus_client multiprocess).
        metrics_dir = tempfile.mkdtemp(prefix="headrace-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        mp = multiprocessing.get_context("spawn")
        try:
            if par.needs_coordinator:
                coord = CoordinatorConfig(addresses, par.data_parallel_size, par.local_ranks)
                proc = mp.Process(target=run_coordinator, args=(coord,), name="Coordinator")
                proc.start()
                self.coordinator.append(proc)
            self.engines = spawn_engines(self.cfg, addresses)
            pids: list[int | None] = [None] * par.data_parallel_size
            for rank, engine in zip(par.local_ranks, self.engines, strict=True):
                pids[rank] = engine.pid
            for i in range(par.api_server_count):
                args = ApiServerArgs(server, i, addresses, tuple(pids))
                proc = mp.Process(target=run_api_server, args=(args, sock), name=f"ApiServer_{i}")
                proc.start()
                self.api_servers.append(proc)
            sock.close()  # the API servers hold their own copies
            return self._supervise()
        finally:
            self._stop_all()
            addresses.cleanup()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            _stop_resource_tracker()

    def _supervise(self) -> int:
        reported: set[int] = set()
        while not self.stop_requested:
            children = (*self.api_servers, *self.coordinator, *self.engines)
            wait([p.sentinel for p in children if p.is_alive()], timeout=0.5)
            for proc in self.api_servers:
                if proc.exitcode is not None and proc.pid not in reported:
                    reported.add(proc.pid or 0)
                    _mark_dead(proc.pid)
            for proc in (*self.api_servers, *self.coordinator):
                if proc.exitcode is not None and not self.stop_requested:
                    logger.error("%s exited with code %s; stopping", proc.name, proc.exitcode)
                    return 1
            for proc in self.engines:
                if proc.exitcode is not None and proc.pid not in reported:
                    reported.add(proc.pid or 0)
                    logger.error(
                        "%s exited with code %s; the server reports failed until restarted",
                        proc.name, proc.exitcode,
                    )  # fmt: skip
        return 0

    def _stop_all(self) -> None:
        api_grace = self.cfg.shutdown_timeout + 5.0
        # API servers already got SIGTERM from _on_signal when a signal started the stop.
        _terminate(self.api_servers, api_grace, signal_them=not self.stop_requested)
        _terminate(self.engines, _ENGINE_GRACE_S)
        _terminate(self.coordinator, _ENGINE_GRACE_S)  # last: it tells headless nodes to stop


def _settle_child_environment() -> None:
    """Set before any child imports torch."""
    # Spin-waiting OpenMP threads starve the API server.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def spawn_engines(cfg: LaunchConfig, addresses: Addresses) -> list[BaseProcess]:
    """One engine-core process per local rank. Several engines on one machine share its cores:
    each gets an equal share of threads unless OMP_NUM_THREADS says otherwise."""
    from headrace.engine.proc import EngineProcConfig, run_engine_core

    ranks = cfg.parallel.local_ranks
    threads = 0
    if len(ranks) > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // len(ranks))
    mp = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    for rank in ranks:
        engine_cfg = EngineProcConfig(rank, cfg.engine, addresses, cfg.load_delay_s, threads)
        proc = mp.Process(target=run_engine_core, args=(engine_cfg,), name=f"EngineCore_{rank}")
        proc.start()
        procs.append(proc)
    return procs


def _mark_dead(pid: int | None) -> None:
    """Drop a dead API server's live gauges from the shared metrics directory."""
    if pid is not None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)


def _stop_resource_tracker() -> None:
    """multiprocessing's spawn starts a resource-tracker child; stop and reap it now, so no
    process of ours outlives the launcher (it would otherwise exit a moment later)."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


def _terminate(procs: list[BaseProcess], grace_s: float, signal_them: bool = True) -> None:
    for proc in procs:
        if signal_them and proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("%s did not stop in %.0f s; killing it", proc.name, grace_s)
            proc.kill()
            proc.join(5)


HEAD_LOST_S = 10.0  # a headless node with no word from the head for this long stops
_HELLO_LOG_S = 10.0


def run_headless(cfg: LaunchConfig) -> int:
    """`headrace serve --headless`: this node's engines for the head at the data-parallel
    address. Returns the exit code."""
    import zmq

    from headrace.wire.codec import Codec
    from headrace.wire.messages import (
        WIRE_VERSION,
        HeadHeartbeat,
        HeadMessage,
        NodeHello,
        NodeRefused,
        NodeShutdown,
        NodeWelcome,
    )

    par = cfg.parallel
    head = f"tcp://{par.data_parallel_address}:{par.data_parallel_rpc_port}"
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _f: stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _f: stop.append(signum))
    _settle_child_environment()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
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
    engines: list[BaseProcess] = []
    heard, since_log = time.monotonic(), time.monotonic()
    code = 0
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
                if isinstance(msg, NodeWelcome) and not engines:
                    addresses = Addresses(
                        tuple(msg.api_inputs), tuple(msg.api_outputs), msg.coordinator_input
                    )
                    engines = spawn_engines(cfg, addresses)
                    logger.info("joined: %d engine(s) starting", len(engines))
                elif not isinstance(msg, HeadHeartbeat | NodeWelcome):
                    logger.warning("unexpected message from the head: %r", msg)
            now = time.monotonic()
            if not engines and now - since_log >= _HELLO_LOG_S:
                logger.info("still waiting for the head at %s", head)
                since_log = now
            elif engines and now - heard > HEAD_LOST_S:
                logger.error("no word from the head for %.0f s; stopping", now - heard)
                return 1
            for proc in engines:
                if proc.exitcode is not None and proc.pid is not None:
                    logger.error("%s exited with code %s", proc.name, proc.exitcode)
                    proc.join()
                    engines.remove(proc)
                    code = 1
                    break
            if code:
                return code
        logger.info("received %s: stopping", signal.Signals(stop[0]).name)
        return 0
    finally:
        _terminate(engines, _ENGINE_GRACE_S)
        ctx.destroy(linger=0)
        _stop_resource_tracker()
