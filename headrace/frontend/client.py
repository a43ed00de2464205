"""The API server's side of the ZMQ boundary: sends requests to engines, routes their outputs back.

Binds this server's ROUTER (requests out; engines' READY and loading progress in) and PULL
(one `EngineCoreOutputs` per engine step); with several engines it also subscribes to the
coordinator's load vector. Background tasks: the handshake reader, the output reader (which runs
`OutputProcessor` for the whole step in one pass), the load-vector reader, and a watchdog that
notices an engine process that exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from headrace.frontend.engines import EnginePhase, EngineStatus, process_alive
from headrace.frontend.load_balance import LoadBalancer, NoEngineError
from headrace.frontend.output import (
    EngineError,
    OutputProcessor,
    RequestStream,
    SeqState,
    fan_out,
    new_detokenizer,
)
from headrace.frontend.queue_board import QueueRow
from headrace.supervise import EngineBoard, RankStatus
from headrace.wire.codec import Codec, engine_input_codec, engine_message_codec
from headrace.wire.messages import (
    AbortRequests,
    AddRequest,
    ApiServerHello,
    EngineCoreOutputs,
    EngineFailed,
    EngineLoading,
    EngineReady,
    EngineStats,
    LoadVector,
    SamplingParams,
)
from headrace.wire.sockets import Addresses, engine_identity

logger = logging.getLogger("headrace.client")

_WATCHDOG_INTERVAL_S = 0.25


class EngineClient:
    """All engines as seen from API server `api_index`. The launcher's `board` gives each local
    rank's pid and whether it is restarting or failed for good; ranks on other machines have no
    pid there, and the coordinator's vector says when one is lost or failed."""

    def __init__(
        self,
        addresses: Addresses,
        api_index: int,
        board: EngineBoard,
        stall_timeout: float = 60.0,
        counts: QueueRow | None = None,
    ) -> None:
        self.stall_timeout = stall_timeout
        self.addresses = addresses
        self.api_index = api_index
        self.board = board
        self.engines = [EngineStatus(i) for i in range(board.num_ranks)]
        self.balancer = LoadBalancer(len(self.engines), addresses.num_api_servers, api_index)
        self.output = OutputProcessor(counts=counts)
        self.ctx = zmq.asyncio.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted engine takes its id back
        self.router.bind(addresses.bind(addresses.api_inputs[api_index]))
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(addresses.bind(addresses.api_outputs[api_index]))
        self.sub: zmq.asyncio.Socket | None = None
        if addresses.coordinator_publish is not None:
            self.sub = self.ctx.socket(zmq.SUB)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.sub.connect(addresses.coordinator_publish)
        # Startup and lifecycle news is logged by API server 0; the others say it at DEBUG.
        self.news_level = logging.INFO if api_index == 0 else logging.DEBUG
        self._in_codec = engine_input_codec()
        self._handshake_codec = engine_message_codec()
        self._outputs_codec = Codec(EngineCoreOutputs)  # the PULL socket carries only these
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()  # abort and re-sends in flight
        self.tokenizer: Any = None  # set once loaded; used to build detokenizers
        self.on_stats: list[Callable[[EngineCoreOutputs], None]] = []  # once per step message
        self.on_ready: list[Callable[[EngineReady], None]] = []

    def start(self) -> None:
        """Start the background tasks (once; later calls do nothing)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._handshake_loop(), name="engine-handshake"),
            loop.create_task(self._output_loop(), name="engine-outputs"),
            loop.create_task(self._watchdog(), name="engine-watchdog"),
            loop.create_task(self._greet(), name="engine-greeting"),
        ]
        if self.sub is not None:
            self._tasks.append(loop.create_task(self._vector_loop(), name="load-vector"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_ready(self) -> int:
        return sum(e.phase is EnginePhase.READY for e in self.engines)

    @property
    def started(self) -> bool:
        """Every engine was ready once (before that the server is loading, not restarting)."""
        return all(e.ever_ready for e in self.engines)

    @property
    def failed(self) -> EngineStatus | None:
        return next((e for e in self.engines if e.phase is EnginePhase.FAILED), None)

    @property
    def max_model_len(self) -> int:
        lens = [e.info.max_model_len for e in self.engines if e.info is not None]
        return min(lens) if lens else 0

    # -- requests ------------------------------------------------------------------------------
    async def add(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        arrival_time: float | None = None,
        pinned: int | None = None,
    ) -> RequestStream:
        """Send `n` engine requests per prompt; choice index = prompt_index * n + j. `pinned`:
        every choice goes to that data-parallel rank (checked to be in range by the caller).

        Raises EngineError (nothing queued) when no engine can take work."""
        stream = RequestStream(request_id, prompts)
        if arrival_time is not None:
            stream.arrival_time = arrival_time
        ready = [e.phase is EnginePhase.READY for e in self.engines]
        in_flight = [self.output.num_in_flight(e.index) for e in self.engines]
        want_logprobs = params.logprobs is not None
        sends: list[tuple[int, AddRequest]] = []
        for index, msg in fan_out(request_id, prompts, params, time.time()):
            try:
                engine = self.balancer.pick(ready, in_flight, pinned)
            except NoEngineError as exc:
                self.abort(stream)
                raise EngineError(str(exc)) from None
            if in_flight[engine] == 0:  # the stall clock starts when work arrives
                self.engines[engine].last_message_time = time.monotonic()
            in_flight[engine] += 1
            prompt = msg.prompt_token_ids
            detok = new_detokenizer(self.tokenizer, prompt, params)
            seq = SeqState(msg.request_id, index, engine, detok, stream, want_logprobs, len(prompt))
            room = self.max_model_len - len(prompt)
            seq.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
            seq.params_max_tokens = params.max_tokens
            seq.wire, seq.pinned = msg, pinned is not None
            self.output.add(seq)
            sends.append((engine, AddRequest(request=msg)))
        for engine, add in sends:
            await self._send(engine, add)
        return stream

    def abort(self, stream: RequestStream) -> None:
        """The client went away: forget its choices here and free them in their engines.

        Synchronous (the send is a task), so it is safe in a cancelled task's `finally`."""
        by_engine: dict[int, list[str]] = {}
        for seq in stream.seqs:
            if not seq.finished:
                by_engine.setdefault(seq.engine_index, []).append(seq.request_id)
        for engine, ids in by_engine.items():
            self.output.forget(ids)
            self._abort_soon(engine, ids)

    def abort_all(self) -> int:
        """Shutdown: end every in-flight choice with finish_reason `abort`; returns how many."""
        by_engine = self.output.abort_all()
        for engine, ids in by_engine.items():
            self._abort_soon(engine, ids)
        return sum(len(ids) for ids in by_engine.values())

    def _abort_soon(self, engine: int, ids: list[str]) -> None:
        """Send AbortRequests from a task (callers may be cancelled tasks that cannot await)."""
        self._send_soon(engine, AbortRequests(request_ids=ids))

    def _send_soon(self, engine: int, msg: AddRequest | AbortRequests) -> None:
        task = asyncio.get_running_loop().create_task(self._send(engine, msg))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, engine: int, msg: AddRequest | AbortRequests) -> None:
        if self.engines[engine].phase in (EnginePhase.DOWN, EnginePhase.FAILED):
            if isinstance(msg, AddRequest):  # went down since it was picked: rescue it now
                self._rescue(engine, f"engine {engine} went down")
            return
        try:
            await self.router.send_multipart([engine_identity(engine), self._in_codec.encode(msg)])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the engine's socket is gone
            self._engine_down(engine, f"cannot reach engine {engine}: {exc}")

    # -- background tasks ----------------------------------------------------------------------
    async def _handshake_loop(self) -> None:
        while True:
            _identity, data = await self.router.recv_multipart()
            msg = self._handshake_codec.decode(data)
            if not 0 <= msg.engine_index < len(self.engines):
                logger.error("a message from engine %d, which is not a rank here", msg.engine_index)
                continue
            engine = self.engines[msg.engine_index]
            engine.last_message_time = time.monotonic()
            if isinstance(msg, EngineLoading):
                if engine.phase is EnginePhase.READY:  # replaced before we noticed it went
                    self._engine_down(msg.engine_index, f"engine {msg.engine_index} restarted")
                remote = self.board.pid(msg.engine_index) is None
                if engine.phase is EnginePhase.DOWN or (
                    engine.phase is EnginePhase.FAILED and remote  # its node joined again
                ):
                    engine.phase = EnginePhase.LOADING  # its replacement is starting
                engine.load_phase, engine.load_fraction = msg.phase, msg.fraction
                logger.log(
                    self.news_level,
                    "engine %d loading: %s %.0f%%", msg.engine_index, msg.phase, 100 * msg.fraction,
                )  # fmt: skip
            elif isinstance(msg, EngineReady):
                if engine.phase is EnginePhase.READY:
                    continue  # again, in answer to our greeting
                if engine.error is not None:
                    logger.warning("engine %d is back after: %s", msg.engine_index, engine.error)
                    engine.error = None
                engine.info, engine.phase, engine.ever_ready = msg, EnginePhase.READY, True
                for callback in self.on_ready:
                    callback(msg)
                engine.load_phase, engine.load_fraction = "ready", 1.0
                logger.log(
                    self.news_level,
                    "engine %d ready: %d KV blocks of %d tokens (%s), max_model_len %d, weights %s",
                    msg.engine_index, msg.num_kv_blocks, msg.block_size, msg.kv_cache_dtype,
                    msg.max_model_len, msg.dtype,
                )  # fmt: skip
            elif isinstance(msg, EngineFailed):
                self._engine_down(msg.engine_index, msg.message)

    async def _vector_loop(self) -> None:
        """The coordinator's load vector: routing input, and the word on lost remote engines."""
        assert self.sub is not None
        codec = Codec(LoadVector)
        while True:
            vector = codec.decode(await self.sub.recv())
            if len(vector.waiting) != len(self.engines):
                continue
            self.balancer.publish(vector.waiting, vector.running, vector.kv_cache_usage)
            failed = vector.failed or [False] * len(self.engines)
            for engine, lost, out in zip(self.engines, vector.lost, failed, strict=True):
                if self.board.pid(engine.index) is not None:
                    continue  # a local rank: its process and the launcher's board say more
                if out:
                    self._engine_down(engine.index, "its node is out of restarts", for_good=True)
                elif lost and engine.phase in (EnginePhase.READY, EnginePhase.LOADING):
                    self._engine_down(
                        engine.index, f"engine {engine.index} is lost: it stopped reporting"
                    )

    async def _output_loop(self) -> None:
        while True:
            msg = self._outputs_codec.decode(await self.pull.recv())
            engine = self.engines[msg.engine_index]
            engine.last_message_time = time.monotonic()
            to_abort = self.output.process(msg.outputs)
            if to_abort:
                await self._send(msg.engine_index, AbortRequests(request_ids=to_abort))
            for callback in self.on_stats:
                callback(msg)

    async def _greet(self) -> None:
        """Say hello to every engine once it is connected: an engine that outlived an earlier
        process of this API server drops that one's requests and says READY again."""
        hello = self._in_codec.encode(ApiServerHello(api_index=self.api_index))
        waiting = set(range(len(self.engines)))
        while waiting:
            for index in sorted(waiting):
                try:
                    await self.router.send_multipart([engine_identity(index), hello], zmq.NOBLOCK)
                except zmq.ZMQError:  # not connected yet
                    continue
                waiting.discard(index)
            await asyncio.sleep(0.1)

    async def _watchdog(self) -> None:
        """Every 250 ms: a local engine whose process is gone is down (its launcher restarts it;
        the board says when it is out of restarts); one that holds our requests but reported no
        step for `stall_timeout` seconds is reported to the launcher, which kills and restarts
        it, and is down from now."""
        while True:
            await asyncio.sleep(_WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            for engine in self.engines:
                rank = engine.index
                if engine.phase is EnginePhase.FAILED:
                    continue
                if self.board.status(rank) is RankStatus.FAILED:
                    self._engine_down(rank, "it is out of restarts", for_good=True)
                    continue
                if engine.phase is EnginePhase.DOWN:
                    continue
                pid = self.board.pid(rank)
                if pid is not None and not process_alive(pid):
                    self._engine_down(rank, f"engine {rank} process exited")
                    continue
                idle_for = now - engine.last_message_time
                if (
                    engine.phase is EnginePhase.READY
                    and idle_for > self.stall_timeout
                    and self.output.num_in_flight(rank)
                ):
                    if pid is not None:
                        self.board.report_stall(rank)
                    self._engine_down(
                        rank,
                        f"engine {rank} completed no step for {idle_for:.0f} s while holding "
                        "requests",
                    )

    def _engine_down(self, index: int, message: str, for_good: bool = False) -> None:
        """Engine `index` is gone (`for_good`: and stays gone). Its requests are re-sent or
        ended now (`_rescue`)."""
        engine = self.engines[index]
        new = EnginePhase.FAILED if for_good else EnginePhase.DOWN
        if engine.phase in (new, EnginePhase.FAILED):
            return
        was_up = engine.phase in (EnginePhase.READY, EnginePhase.LOADING)
        if for_good:
            message = f"engine {index} failed for good: {message}"
        logger.error("engine %d %s: %s", index, new.value, message)
        engine.phase, engine.error = new, message
        idle = EngineCoreOutputs(
            engine_index=index, outputs=[], stats=EngineStats(has_counters=False)
        )
        for callback in self.on_stats:  # its gauges read 0 while it is down
            callback(idle)
        if was_up:
            self._rescue(index, message)

    def _rescue(self, index: int, message: str) -> None:
        """The choices on a lost engine: each that showed its client nothing yet (and was not
        pinned, nor re-sent before) goes once to a live engine; the rest end with an error
        now, a retryable one (503 + Retry-After before a response started)."""
        live = [e.phase is EnginePhase.READY for e in self.engines]
        in_flight = [self.output.num_in_flight(e.index) for e in self.engines]
        for seq in self.output.on_engine(index):
            fresh = seq.num_output_tokens == 0 or not seq.stream.streaming
            target = None
            if fresh and not seq.pinned and not seq.resent and seq.wire is not None:
                with contextlib.suppress(NoEngineError):
                    target = self.balancer.pick(live, in_flight)
            if target is None or seq.wire is None:
                self.output.lose(seq, EngineError(f"engine failed: {message}", retryable=True))
                continue
            in_flight[target] += 1
            rid = f"{seq.request_id}-resent"
            seq.wire = msgspec.structs.replace(seq.wire, request_id=rid)
            detok = new_detokenizer(
                self.tokenizer, seq.wire.prompt_token_ids, seq.wire.sampling_params
            )
            self.output.restart(seq, rid, target, detok)
            logger.info("request %s re-sent to engine %d", rid, target)
            self._send_soon(target, AddRequest(request=seq.wire))
