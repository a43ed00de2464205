"""What every route shares: config, the engine client, the tokenizer, and the server's state."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from headrace.api.admission import Admission
from headrace.api.body import BodyDecoder
from headrace.api.errors import APIError
from headrace.config import ServerConfig
from headrace.frontend.client import EngineClient
from headrace.frontend.tokenize import FrontendTokenizer
from headrace.metrics.prometheus import ServerMetrics
from headrace.metrics.stats import StatsLogger

RETRY_AFTER_S = "5"


class ServerState(enum.StrEnum):
    """DESIGN §4: loading -> ready -> draining -> stopped; degraded (some engines restarting,
    others serving) and restarting (none serving, recovery under way) after the first ready;
    failed (out of restarts, or the tokenizer did not load) from any state."""

    LOADING = "loading"
    READY = "ready"
    DEGRADED = "degraded"
    RESTARTING = "restarting"
    DRAINING = "draining"
    FAILED = "failed"

    @property
    def serving(self) -> bool:
        return self in (ServerState.READY, ServerState.DEGRADED)


@dataclass(eq=False)
class ServerContext:
    """One per API-server process, stored on `app.state.ctx`."""

    config: ServerConfig
    client: EngineClient
    metrics: ServerMetrics
    admission: Admission
    bodies: BodyDecoder
    tokenizer: FrontendTokenizer | None = None
    tokenizer_error: str | None = None
    draining: bool = False
    stats_logger: StatsLogger | None = None
    started: float = 0.0

    @property
    def state(self) -> ServerState:
        if self.tokenizer_error is not None or self.client.failed is not None:
            return ServerState.FAILED
        if self.draining:
            return ServerState.DRAINING
        if self.tokenizer is None or not self.client.started:
            return ServerState.LOADING
        ready = self.client.num_ready
        if ready == len(self.client.engines):
            return ServerState.READY
        return ServerState.DEGRADED if ready else ServerState.RESTARTING

    @property
    def failure(self) -> str | None:
        if self.tokenizer_error is not None:
            return f"tokenizer failed to load: {self.tokenizer_error}"
        engine = self.client.failed
        return None if engine is None else engine.error

    @property
    def load_fraction(self) -> float:
        """Mean fraction of weights loaded over the engines."""
        fractions = [e.load_fraction for e in self.client.engines]
        return sum(fractions) / max(1, len(fractions))

    def engine_states(self) -> list[dict[str, object]]:
        """Each rank's phase, and why it is down (degraded / restarting bodies)."""
        out: list[dict[str, object]] = []
        for e in self.client.engines:
            item: dict[str, object] = {"engine": e.index, "state": e.phase.value}
            if e.error is not None:
                item["error"] = e.error
            out.append(item)
        return out

    def load_progress(self) -> dict[str, object]:
        engines = [
            {"engine": e.index, "phase": e.load_phase, "fraction": round(e.load_fraction, 4)}
            for e in self.client.engines
        ]
        return {
            "fraction": round(self.load_fraction, 4),
            "tokenizer": "ready" if self.tokenizer is not None else "loading",
            "engines": engines,
        }

    def require_serving(self) -> FrontendTokenizer:
        """The tokenizer, if inference may run now; else the state's error (503, or 500)."""
        state = self.state
        if state.serving and self.tokenizer is not None:
            return self.tokenizer
        retry = {"Retry-After": RETRY_AFTER_S}
        if state is ServerState.FAILED:
            raise APIError(503, f"the server has failed: {self.failure}", headers=retry)
        if state is ServerState.DRAINING:
            raise APIError(503, "the server is shutting down", headers=retry)
        if state is ServerState.RESTARTING:
            raise APIError(503, "no engine is serving: restarting; retry shortly", headers=retry)
        raise APIError(503, "the model is still loading; retry shortly", headers=retry)

    def check_model(self, name: str | None) -> str:
        """The served name the request addressed (None means the first one), or 404."""
        names = self.config.served_model_names
        if name is None or name == "":
            return names[0]
        if name not in names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")
        return name
