"""The engine-core process: `EngineCore` plus sockets, and nothing else.

Three threads, so the model's forward pass (which releases the GIL) overlaps with socket IO:

    input thread   DEALER x N  --decode-->  inputs queue
    main thread    inputs queue --> EngineCore add/abort/step --> outputs queue
    output thread  outputs queue --encode--> PUSH x N

1. Connect to every API server, then load the model, sending `EngineLoading` progress.
2. Send `EngineReady` (KV blocks, max_model_len: values only the engine can know).
3. Loop: take every pending input (block only when idle); step while there is work; send one
   `EngineCoreOutputs` per step to each API server that owns a request in it (stats to all).
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

from headrace.config import EngineConfig
from headrace.process import die_with_parent, set_process_name, setup_logging
from headrace.wire.codec import engine_input_codec, engine_message_codec
from headrace.wire.messages import (
    AbortRequests,
    AddRequest,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineFailed,
    EngineInput,
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


@dataclass(frozen=True, slots=True)
class EngineProcConfig:
    """One engine process's slice: its rank, the engine config and where the API servers are."""

    engine_index: int
    engine: EngineConfig
    addresses: Addresses
    load_delay_s: float = 0.0  # testing knob: stretch loading so tests can observe it


def run_engine_core(cfg: EngineProcConfig) -> None:
    """Entry point of an engine process (spawned by the launcher)."""
    setup_logging()
    die_with_parent()
    set_process_name(f"hr-engine-{cfg.engine_index}")
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
        for i in range(cfg.addresses.num_api_servers):
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, identity)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.connect(cfg.addresses.input_address(i))
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(cfg.addresses.output_address(i))
            self.dealers.append(dealer)
            self.pushes.append(push)
        self.dealer_lock = threading.Lock()  # handshake sends (main) vs recv (input thread)
        self.inputs: queue.Queue[tuple[int, EngineInput]] = queue.Queue()
        self.outputs: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.codec = engine_message_codec()
        self.owner: dict[str, int] = {}  # request id -> index of the API server that sent it
        self._last_progress = 0.0
        self._load_start = time.monotonic()

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

        self._to_dealers(EngineLoading(engine_index=self.index, phase="starting", fraction=0.0))
        core = EngineCore(self.cfg.engine, self._progress)
        info = core.info
        self._to_dealers(
            EngineReady(
                engine_index=self.index,
                num_kv_blocks=info.num_kv_blocks,
                block_size=info.block_size,
                max_model_len=info.max_model_len,
                dtype=info.dtype,
                kv_cache_dtype=info.kv_cache_dtype,
                model_type=core.runner.arch.architecture,
            )
        )
        threading.Thread(target=self._input_loop, name="engine-input", daemon=True).start()
        threading.Thread(target=self._output_loop, name="engine-output", daemon=True).start()
        logger.info("engine %d ready", self.index)
        self._busy_loop(core)

    # -- steady state --------------------------------------------------------------------------
    def _busy_loop(self, core: EngineCore) -> None:
        while True:
            outputs = self._take_inputs(core, block=not core.has_unfinished_requests())
            if core.has_unfinished_requests():
                outputs.extend(core.step())
            self._send(outputs, core)

    def _take_inputs(self, core: EngineCore, block: bool) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        try:
            item = self.inputs.get(block=block)
        except queue.Empty:
            return outputs
        while True:
            api_index, msg = item
            if isinstance(msg, AddRequest):
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
            try:
                item = self.inputs.get_nowait()
            except queue.Empty:
                return outputs

    def _send(self, outputs: list[EngineCoreOutput], core: EngineCore) -> None:
        stats = core.stats()
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
                self.inputs.put((index_of[sock], codec.decode(data)))

    def _output_loop(self) -> None:
        while True:
            api_index, data = self.outputs.get()
            self.pushes[api_index].send(data)
