"""`headrace serve`: bind the port, spawn engines and API servers, supervise them, stop them.

1. Bind the listening socket at once (clients and probes connect from the first second; API
   servers inherit it, so N servers share one port).
2. Spawn one engine-core process per data-parallel rank, then the API servers (they show
   `loading` until every engine sends READY).
3. Watch every child: an API server that exits stops everything (exit 1); an engine that exits is
   reported by the API servers (failed), and the launcher keeps serving that state until stopped.
4. SIGINT / SIGTERM: SIGTERM to the API servers (they finish in-flight work), then to the engines;
   anything still alive after its grace period is killed. Exit 0.
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
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from headrace.config import EngineConfig, ServerConfig
from headrace.wire.sockets import Addresses

logger = logging.getLogger("headrace.launch")

_ENGINE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    server: ServerConfig
    engine: EngineConfig
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
        server = self.cfg.server
        sock = bind_socket(server.host, server.port)  # first: clients may connect from now on
        logger.info("listening on %s:%d", server.host or "*", server.port)
        from headrace.api.app import ApiServerArgs, run_api_server
        from headrace.engine.proc import EngineProcConfig, run_engine_core

        addresses = Addresses.create(server.api_server_count)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # Set before any child imports torch: spin-waiting OpenMP threads starve the API server.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # API servers share their metrics through files here (prometheus_client multiprocess).
        metrics_dir = tempfile.mkdtemp(prefix="headrace-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        mp = multiprocessing.get_context("spawn")
        try:
            for i in range(server.data_parallel_size):
                engine_cfg = EngineProcConfig(i, self.cfg.engine, addresses, self.cfg.load_delay_s)
                proc = mp.Process(
                    target=run_engine_core, args=(engine_cfg,), name=f"EngineCore_{i}"
                )
                proc.start()
                self.engines.append(proc)
            pids = tuple(p.pid for p in self.engines)
            for i in range(server.api_server_count):
                args = ApiServerArgs(server, i, addresses, pids)
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
            sentinels = [p.sentinel for p in (*self.api_servers, *self.engines) if p.is_alive()]
            wait(sentinels, timeout=0.5)
            for proc in self.api_servers:
                if proc.exitcode is not None and proc.pid not in reported:
                    reported.add(proc.pid or 0)
                    _mark_dead(proc.pid)
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
