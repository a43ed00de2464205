"""Which engine gets a new request: the live engine with the lowest score.

Each API server sees the coordinator's load vector (every engine's waiting and running requests
and KV usage, published at most every 100 ms while it changes) plus what it sent itself since
that publication, which no publication can show yet. Per engine e:

    waiting'  = waiting[e] + sent_since_publication[e]
    score     = max(N x in_flight_here[e], waiting' + running[e])
                + 6 x waiting' x max(0, kv_usage[e] - 0.5)

N is the number of API servers: this server's own in-flight requests, times N, estimate the
engine's load when the vector is stale and every server is being hit alike. The second term
steers away from an engine whose queue waits on a nearly full KV cache. Ties go to the first
engine in a rotation that starts at this server's index and advances per pick, so two servers
with the same view do not herd onto one engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KV_PRESSURE_WEIGHT = 6.0
KV_PRESSURE_KNEE = 0.5


@dataclass(slots=True)
class EngineLoadView:
    """One engine's load as last published, plus what this server sent there since."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    sent_since_publication: int = 0


class NoEngineError(LookupError):
    """No engine may take this request now (none live, or the pinned one is not)."""


class LoadBalancer:
    """Per-API-server routing state: the published vector, own sends, the tie rotation."""

    def __init__(self, num_engines: int, num_api_servers: int = 1, api_index: int = 0) -> None:
        self.loads = [EngineLoadView() for _ in range(num_engines)]
        self.num_api_servers = num_api_servers
        self._rotation = api_index % max(1, num_engines)

    def publish(
        self, waiting: Sequence[int], running: Sequence[int], kv_usage: Sequence[float]
    ) -> None:
        """A new vector arrived: it now covers what was sent before it."""
        for load, w, r, kv in zip(self.loads, waiting, running, kv_usage, strict=True):
            load.waiting, load.running, load.kv_cache_usage = w, r, kv
            load.sent_since_publication = 0

    def score(self, engine: int, in_flight_here: int) -> float:
        load = self.loads[engine]
        waiting = load.waiting + load.sent_since_publication
        base = max(self.num_api_servers * in_flight_here, waiting + load.running)
        pressure = max(0.0, load.kv_cache_usage - KV_PRESSURE_KNEE)
        return base + KV_PRESSURE_WEIGHT * waiting * pressure

    def pick(
        self, live: Sequence[bool], in_flight: Sequence[int], pinned: int | None = None
    ) -> int:
        """The engine for one request (counted as sent there). Raises NoEngineError."""
        if pinned is not None:
            if not live[pinned]:
                raise NoEngineError(f"data-parallel rank {pinned} is not serving")
            best = pinned
        else:
            n = len(self.loads)
            best, best_score = -1, 0.0
            for k in range(n):
                e = (self._rotation + k) % n
                if not live[e]:
                    continue
                s = self.score(e, in_flight[e])
                if best < 0 or s < best_score:
                    best, best_score = e, s
            if best < 0:
                raise NoEngineError("no engine is ready")
            self._rotation = (self._rotation + 1) % n
        self.loads[best].sent_since_publication += 1
        return best
