"""The engine-core process: `EngineCore` plus sockets, and nothing else.

Three threads, so the model's forward pass (which releases the GIL) overlaps with socket IO:

    input thread   DEALER x N  --decode-->  inputs queue
    main thread    inputs queue --> EngineCore add/abort/step --> outputs queue
    output thread  outputs queue --encode--> PUSH x N
    load thread    (with a coordinator) EngineLoad on change, and every heartbeat interval

1. Connect to every API server, then load the model, sending `EngineLoading` progress.
2. Send `EngineReady` (KV blocks, max_model_len: values only the engine can know).
3. Loop: take every pending input (block only when idle); step while there is work; send one
   `EngineCoreOutputs` per step to each API server that owns a request in it (stats to all).
   With a coordinator, report (waiting, running, KV usage) whenever it changes: a request counts
   as waiting from the moment the input thread decodes it, so a burst that lands mid-step is
   visible before the step ends.
A load error or a crashed step is sent as `EngineFailed` before the process exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from headrace import envs
from headrace.config import EngineConfig
from headrace.process import die_with_parent, set_title, setup_logging
from headrace.wire.codec import engine_input_codec, engine_message_codec
from headrace.wire.messages import (
    AbortRequests,
    AddRequest,
    ApiServerHello,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineFailed,
    EngineInput,
    EngineLoad,
    EngineLoading,
    EngineReady,
    EngineStats,
    FinishReason,
)
from headrace.wire.sockets import Addresses, engine_identity

if TYPE_CHECKING:
    from headrace.engine.core import EngineCore

logger = logging.getLogger("headrace.engine")

_PROGRESS_INTERVAL_S = 0.25
_GRAMMAR_POLL_S = 0.002  # how often a step waiting only on grammar compiles looks again
HEARTBEAT_INTERVAL_S = 0.5  # EngineLoad is re-sent this often when nothing changes


@dataclass(frozen=True, slots=True)
class EngineProcConfig:
    """One engine process's slice: its rank, the engine config and where the API servers are."""

    engine_index: int  # the global data-parallel rank
    engine: EngineConfig
    addresses: Addresses
    load_delay_s: float = 0.0  # testing knob: stretch loading so tests can observe it
    num_threads: int = 0  # compute threads (OpenMP and torch); 0: as the environment says
    start_number: int = 0  # 0 for the first process of this rank, then 1 per restart


def run_engine_core(cfg: EngineProcConfig) -> None:
    """Entry point of an engine process (spawned by the launcher)."""
    setup_logging()
    die_with_parent()
    set_title(f"EngineCore_{cfg.engine_index}")
    if cfg.num_threads:  # before torch loads (in _EngineProc.run)
        os.environ["OMP_NUM_THREADS"] = str(cfg.num_threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when engines stop
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    proc = _EngineProc(cfg)
    try:
        proc.run()
    except Exception as exc:
        logger.exception("engine %d failed", cfg.engine_index)
        proc.send_failed(f"{type(exc).__name__}: {exc}")
        time.sleep(0.2)  # let the output thread flush the failure
        os._exit(1)


class _EngineProc:
    def __init__(self, cfg: EngineProcConfig) -> None:
        self.cfg = cfg
        self.index = cfg.engine_index
        self.ctx = zmq.Context()
        identity = engine_identity(self.index)
        self.dealers: list[zmq.Socket] = []
        self.pushes: list[zmq.Socket] = []
        for input_address, output_address in zip(
            cfg.addresses.api_inputs, cfg.addresses.api_outputs, strict=True
        ):
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, identity)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.connect(input_address)
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            # Queue only to an API server that is there (a dead one's messages are dropped, not
            # piled up until the output thread blocks), and deep enough for a slow live one.
            push.setsockopt(zmq.IMMEDIATE, 1)
            push.setsockopt(zmq.SNDHWM, 100_000)
            push.connect(output_address)
            self.dealers.append(dealer)
            self.pushes.append(push)
        self.load: LoadReporter | None = None
        if cfg.addresses.coordinator_input is not None:
            self.load = LoadReporter(self.index, self.ctx, cfg.addresses.coordinator_input)
        self.dealer_lock = threading.Lock()  # handshake sends (main) vs recv (input thread)
        self.inputs: queue.Queue[tuple[int, EngineInput]] = queue.Queue()
        self.outputs: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.codec = engine_message_codec()
        self.owner: dict[str, int] = {}  # request id -> index of the API server that sent it
        self._last_progress = 0.0
        self._load_start = time.monotonic()
        self._taken = 0  # adds taken from the inbox since the last load report
        self.ready: EngineReady | None = None

    # -- start-up ------------------------------------------------------------------------------
    def _to_dealers(self, msg: EngineLoading | EngineReady | EngineFailed) -> None:
        data = self.codec.encode(msg)
        with self.dealer_lock:
            for dealer in self.dealers:
                dealer.send(data)

    def _progress(self, fraction: float) -> None:
        if self.cfg.load_delay_s:  # stretch loading to load_delay_s in total
            time.sleep(
                max(0.0, self._load_start + self.cfg.load_delay_s * fraction - time.monotonic())
            )
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_progress < _PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        self._to_dealers(EngineLoading(engine_index=self.index, phase="weights", fraction=fraction))

    def send_failed(self, message: str) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._to_dealers(EngineFailed(engine_index=self.index, message=message))

    def run(self) -> None:
        from headrace.engine.core import EngineCore  # torch loads here, after env is settled

        if self.load is not None:  # heartbeats from the start: a node lost while loading shows
            threading.Thread(target=self.load.run, name="engine-load", daemon=True).start()
        self._to_dealers(EngineLoading(engine_index=self.index, phase="starting", fraction=0.0))
        dies_from = envs.test_engine_dies_from_start()
        if dies_from is not None and self.cfg.start_number >= dies_from:
            raise RuntimeError(f"HEADRACE_TEST_ENGINE_DIES_FROM_START={dies_from}: dying")
        core = EngineCore(self.cfg.engine, self._progress)
        info = core.info
        self.ready = EngineReady(
            engine_index=self.index,
            num_kv_blocks=info.num_kv_blocks,
            block_size=info.block_size,
            max_model_len=info.max_model_len,
            dtype=info.dtype,
            kv_cache_dtype=info.kv_cache_dtype,
            model_type=core.runner.arch.architecture,
        )
        self._to_dealers(self.ready)
        threading.Thread(target=self._input_loop, name="engine-input", daemon=True).start()
        threading.Thread(target=self._output_loop, name="engine-output", daemon=True).start()
        logger.info("engine %d ready", self.index)
        self._busy_loop(core)

    # -- steady state --------------------------------------------------------------------------
    def _busy_loop(self, core: EngineCore) -> None:
        while True:
            # Only grammars compiling: wait for input a little, not spin on empty steps.
            blocked = core.has_unfinished_requests() and core.blocked()
            outputs = self._take_inputs(
                core, block=blocked or not core.has_unfinished_requests(),
                timeout=_GRAMMAR_POLL_S if blocked else None,
            )  # fmt: skip
            if core.has_unfinished_requests():
                outputs.extend(core.step())
            if outputs or not blocked:
                self._send(outputs, core)

    def _take_inputs(
        self, core: EngineCore, block: bool, timeout: float | None = None
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        try:
            item = self.inputs.get(block=block, timeout=timeout)
        except queue.Empty:
            return outputs
        while True:
            api_index, msg = item
            if isinstance(msg, AddRequest):
                self._taken += 1
                rid = msg.request.request_id
                self.owner[rid] = api_index
                try:
                    core.add_request(msg.request)
                except ValueError as exc:  # the frontend checks first; never fail silently
                    logger.warning("refused request %s: %s", rid, exc)
                    outputs.append(
                        EngineCoreOutput(
                            request_id=rid,
                            new_token_ids=[],
                            finish_reason=FinishReason.ERROR,
                            stop_reason=str(exc),
                        )
                    )
            elif isinstance(msg, AbortRequests):
                outputs.extend(core.abort(msg.request_ids))
            elif isinstance(msg, ApiServerHello):
                outputs.extend(self._api_server_restarted(core, api_index))
            try:
                item = self.inputs.get_nowait()
            except queue.Empty:
                return outputs

    def _api_server_restarted(self, core: EngineCore, api_index: int) -> list[EngineCoreOutput]:
        """API server `api_index` started (again): what its earlier process sent is orphaned,
        so abort it; and tell the new process we are ready."""
        orphans = [rid for rid, owner in self.owner.items() if owner == api_index]
        if orphans:
            logger.info(
                "API server %d restarted: aborting its %d request(s)", api_index, len(orphans)
            )
        assert self.ready is not None
        with self.dealer_lock:
            self.dealers[api_index].send(self.codec.encode(self.ready))
        return core.abort(orphans)

    def _send(self, outputs: list[EngineCoreOutput], core: EngineCore) -> None:
        stats = core.stats()
        if self.load is not None:
            self.load.engine_state(stats, self._taken)
        self._taken = 0
        by_server: dict[int, list[EngineCoreOutput]] = {i: [] for i in range(len(self.pushes))}
        for out in outputs:
            owner = self.owner.get(out.request_id, 0)
            by_server[owner].append(out)
            if out.finish_reason is not None:
                self.owner.pop(out.request_id, None)
        # Counters go to API server 0 only, so N servers do not count them N times.
        load_only = EngineStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            has_counters=False,
        )
        for i, outs in by_server.items():
            msg = EngineCoreOutputs(
                engine_index=self.index, outputs=outs, stats=stats if i == 0 else load_only
            )
            self.outputs.put((i, self.codec.encode(msg)))

    def _input_loop(self) -> None:
        codec = engine_input_codec()
        poller = zmq.Poller()
        for dealer in self.dealers:
            poller.register(dealer, zmq.POLLIN)
        index_of = {dealer: i for i, dealer in enumerate(self.dealers)}
        while True:
            for sock, _ in poller.poll():
                with self.dealer_lock:
                    data = sock.recv()
                msg = codec.decode(data)
                if self.load is not None and isinstance(msg, AddRequest):
                    self.load.arrived()
                self.inputs.put((index_of[sock], msg))

    def _output_loop(self) -> None:
        while True:
            api_index, data = self.outputs.get()
            with contextlib.suppress(zmq.Again):  # that API server is gone (restarting)
                self.pushes[api_index].send(data, zmq.NOBLOCK)


class LoadReporter:
    """Tells the coordinator this engine's (waiting, running, KV usage) whenever it changes,
    and every HEARTBEAT_INTERVAL_S regardless (the coordinator's sign that the engine lives).

    Requests decoded by the input thread but not yet taken by the main loop count as waiting:
    the main loop may be inside a step for tens of milliseconds. One thread owns the socket;
    the others only update numbers under the condition's lock."""

    def __init__(self, index: int, ctx: zmq.Context, address: str) -> None:
        self.index = index
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 100)  # a lost coordinator must not grow our memory
        self.push.connect(address)
        self.cond = threading.Condition()
        self.inbox = 0
        self.waiting = self.running = 0
        self.kv_cache_usage = 0.0
        self.changed = False
        self._codec = engine_message_codec()

    def arrived(self) -> None:
        """Input thread: one more request is on its way to the scheduler."""
        with self.cond:
            self.inbox += 1
            self.changed = True
            self.cond.notify()

    def engine_state(self, stats: EngineStats, taken: int) -> None:
        """Main thread, after each loop: the scheduler's counts, and adds it took meanwhile."""
        new = (stats.num_waiting, stats.num_running, stats.kv_cache_usage)
        with self.cond:
            if not taken and new == (self.waiting, self.running, self.kv_cache_usage):
                return  # most decode steps: nothing to tell, no thread to wake
            self.inbox -= taken
            self.waiting, self.running, self.kv_cache_usage = new
            self.changed = True
            self.cond.notify()

    def current(self) -> EngineLoad:
        return EngineLoad(
            engine_index=self.index,
            num_waiting=self.waiting + self.inbox,
            num_running=self.running,
            kv_cache_usage=self.kv_cache_usage,
        )

    def run(self) -> None:
        last: EngineLoad | None = None
        last_sent = 0.0
        while True:
            with self.cond:
                if not self.changed:
                    self.cond.wait(timeout=HEARTBEAT_INTERVAL_S)
                self.changed = False
                load = self.current()
            now = time.monotonic()
            if load != last or now - last_sent >= HEARTBEAT_INTERVAL_S:
                with contextlib.suppress(zmq.Again):
                    self.push.send(self._codec.encode(load), zmq.NOBLOCK)
                last, last_sent = load, now
