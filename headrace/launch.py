"""`headrace serve`: bind the port, spawn the coordinator, engines and API servers, keep them
running, stop them; and `headrace serve --headless`, a node that only runs engines for a head.

Head (`Launcher.run`):
1. Bind the listening socket at once (clients and probes connect from the first second; API
   servers inherit it, so N servers share one port; the launcher keeps it for restarts).
2. With several engines, spawn the coordinator (load vector; registration of headless nodes);
   then one engine-core process per local data-parallel rank (`supervise.EngineKeeper`), then
   the API servers (they show `loading` until every rank, local or remote, sends READY).
3. Keep them running: an engine that exits, or that an API server reports stalled, is started
   again after a back-off (1 s, 2 s, 4 s ...) up to `--max-engine-restarts` times in 10 minutes,
   then marked failed on the board the API servers read. An API server that exits is started
   again on the same socket under the same limit (past it, everything stops: exit 1). The
   coordinator exiting stops everything (exit 1).
4. SIGINT / SIGTERM: SIGTERM to the API servers (they finish in-flight work on every rank), then
   to the engines, then to the coordinator, which tells headless nodes to stop. Anything still
   alive after its grace period is killed. Exit 0.

Headless node (`run_headless`): register with the head's coordinator (refused: exit 1 with the
reason), keep this node's engines running pointed at the head's endpoints (restarted like the
head's; a rank out of restarts is reported to the head), until the head says stop (exit 0), a
signal arrives (exit 0), or the head goes silent (exit 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import TYPE_CHECKING

from headrace import envs
from headrace.config import EngineConfig, ParallelConfig, ServerConfig
from headrace.frontend.queue_board import QueueBoard
from headrace.supervise import (
    EngineBoard,
    EngineKeeper,
    EngineSpawn,
    RestartSchedule,
    exit_reason,
    terminate,
)
from headrace.wire.sockets import Addresses

if TYPE_CHECKING:
    from headrace.metrics.prometheus import RestartCounters

logger = logging.getLogger("headrace.launch")

ENGINE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    server: ServerConfig
    engine: EngineConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    shutdown_timeout: float = 30.0
    load_delay_s: float = 0.0
    max_restarts: int = 3  # per engine (and per API server) within 10 minutes


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
        self.api_servers: dict[int, BaseProcess] = {}
        self.coordinator: list[BaseProcess] = []  # zero or one
        self.keeper: EngineKeeper | None = None
        self.api_restarts: RestartSchedule[int] = RestartSchedule(cfg.max_restarts)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Forward at once, so readiness turns red now; a second signal is forwarded too (API
        servers then stop without waiting for in-flight requests)."""
        if not self.stop_requested:
            logger.info("received %s: draining", signal.Signals(signum).name)
        self.stop_requested = True
        for proc in self.api_servers.values():
            if proc.is_alive():
                proc.terminate()

    def run(self) -> int:
        server, par = self.cfg.server, self.cfg.parallel
        sock = bind_socket(server.host, server.port)  # first: clients may connect from now on
        logger.info("listening on %s:%d", server.host or "*", server.port)
        # API servers share their metrics through files here (prometheus_client multiprocess);
        # set before prometheus_client is imported, here too (the restart counters).
        metrics_dir = tempfile.mkdtemp(prefix="headrace-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from headrace.coordinator import CoordinatorConfig, run_coordinator
        from headrace.metrics.prometheus import restart_counters

        if par.multi_node:
            addresses = Addresses.tcp(
                par.data_parallel_address, par.data_parallel_rpc_port, par.api_server_count
            )
        else:
            addresses = Addresses.local(par.api_server_count, par.needs_coordinator)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        settle_child_environment()
        counters = restart_counters(server.metrics_namespace)
        board = EngineBoard(par.data_parallel_size)
        mp = multiprocessing.get_context("spawn")
        try:
            if par.needs_coordinator:
                coord = CoordinatorConfig(addresses, par.data_parallel_size, par.local_ranks)
                proc = mp.Process(target=run_coordinator, args=(coord,), name="Coordinator")
                proc.start()
                self.coordinator.append(proc)
            self.keeper = EngineKeeper(
                engine_spawn(self.cfg, addresses),
                par.local_ranks,
                board,
                self.cfg.max_restarts,
                lambda rank, why: counters.engine.labels(str(rank), why).inc(),
            )
            self.keeper.start_all()
            queues = QueueBoard(par.api_server_count)
            children = _Shared(addresses, board, queues, sock, counters)
            for i in range(par.api_server_count):
                self._start_api_server(i, children)
            return self._supervise(children)
        finally:
            sock.close()
            self._stop_all()
            addresses.cleanup()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            stop_resource_tracker()

    def _start_api_server(self, index: int, children: _Shared) -> None:
        from headrace.api.app import ApiServerArgs, run_api_server

        restarted = index in self.api_servers
        if restarted:  # the engines abort what the old process had in flight
            children.queues.clear(index)
        args = ApiServerArgs(
            self.cfg.server, index, children.addresses, children.board, children.queues, restarted
        )
        mp = multiprocessing.get_context("spawn")
        proc = mp.Process(
            target=run_api_server, args=(args, children.sock), name=f"ApiServer_{index}"
        )
        proc.start()
        self.api_servers[index] = proc

    def _supervise(self, children: _Shared) -> int:
        assert self.keeper is not None
        while not self.stop_requested:
            procs = (*self.api_servers.values(), *self.coordinator)
            wait([p.sentinel for p in procs if p.is_alive()] + self.keeper.sentinels(), 0.25)
            if self.stop_requested:
                break
            now = time.monotonic()
            for proc in self.coordinator:
                if proc.exitcode is not None:
                    logger.error("the coordinator exited with code %s; stopping", proc.exitcode)
                    return 1
            if not self._keep_api_servers(now, children):
                return 1
            self.keeper.tick(now)
        return 0

    def _keep_api_servers(self, now: float, children: _Shared) -> bool:
        """Schedule restarts of API servers that exited and start those due; False when one
        is out of restarts."""
        for index, proc in list(self.api_servers.items()):
            if proc.exitcode is None or self.api_restarts.pending(index):
                continue
            _mark_dead(proc.pid)  # its live gauges go; its counters stay in the sum
            reason = exit_reason(proc.exitcode)
            delay = self.api_restarts.ended(index, reason, now)
            if delay is None:
                logger.error("%s ended (%s), out of restarts; stopping", proc.name, reason)
                return False
            logger.error("%s ended (%s); restarting it in %.0f s", proc.name, reason, delay)
        for index, reason in self.api_restarts.take_due(now):
            children.counters.api_server.labels(str(index), reason).inc()
            self._start_api_server(index, children)
        return True

    def _stop_all(self) -> None:
        api_grace = self.cfg.shutdown_timeout + 5.0
        # API servers already got SIGTERM from _on_signal when a signal started the stop.
        terminate(list(self.api_servers.values()), api_grace, not self.stop_requested)
        if self.keeper is not None:
            self.keeper.stop(ENGINE_GRACE_S)
        terminate(self.coordinator, ENGINE_GRACE_S)  # last: it tells headless nodes to stop


@dataclass(frozen=True, slots=True)
class _Shared:
    """What every (re)started API server is handed, and the restart counters."""

    addresses: Addresses
    board: EngineBoard
    queues: QueueBoard
    sock: socket.socket
    counters: RestartCounters


def settle_child_environment() -> None:
    """Set before any child imports torch."""
    # Spin-waiting OpenMP threads starve the API server.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    envs.cap_libraries_for_cpu_backend()


def engine_spawn(cfg: LaunchConfig, addresses: Addresses) -> EngineSpawn:
    """How this machine's engines start. Several engines on one machine share its cores: each
    gets an equal share of threads unless OMP_NUM_THREADS says otherwise. They share its memory
    too: each loader counts on its share of what is available."""
    ranks = cfg.parallel.local_ranks
    threads = 0
    if len(ranks) > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // len(ranks))
    model = dataclasses.replace(cfg.engine.model, engines_per_machine=max(1, len(ranks)))
    engine = dataclasses.replace(cfg.engine, model=model)
    return EngineSpawn(engine, addresses, cfg.load_delay_s, threads)


def _mark_dead(pid: int | None) -> None:
    """Drop a dead API server's live gauges from the shared metrics directory."""
    if pid is not None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)


def stop_resource_tracker() -> None:
    """multiprocessing's spawn starts a resource-tracker child; stop and reap it now, so no
    process of ours outlives the launcher (it would otherwise exit a moment later)."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
