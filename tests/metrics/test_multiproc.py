"""MultiProcessText renders exactly what prometheus_client's own multiprocess collector does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

WRITER = r"""
import random, sys
from headrace.metrics.prometheus import MetricsConfig, ServerMetrics
from headrace.metrics.http import HttpMetrics
from headrace.wire.messages import EngineReady
from prometheus_client import Gauge

seed, index = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
m = ServerMetrics(MetricsConfig("some \"model\"\n", 2, api_server_index=index))
m.engine_ready(EngineReady(engine_index=0, num_kv_blocks=64, block_size=16, max_model_len=4096,
                           dtype="bfloat16", kv_cache_dtype="float32", model_type="llama"),
               True)
for e in m.engines:
    for _ in range(50):
        e.ttft.observe(rng.random() * 3)
        e.prompt_tokens.inc(rng.randrange(100))
        e.prompt_len.observe(rng.randrange(4096))
        e.finished[rng.choice(list(e.finished))].inc()
http = HttpMetrics(m.registry)
for i in range(20):
    http.observe("POST", "/v1/completions", rng.choice([200, 400]), rng.randrange(999),
                 rng.randrange(999), rng.random())
for mode in ("all", "liveall", "min", "max", "sum", "livesum", "mostrecent"):
    Gauge("test_" + mode, "a gauge", ["x"], multiprocess_mode=mode).labels("a").set(rng.random())
"""


def _families(text: str) -> dict[str, tuple[str, str, set[tuple[str, tuple, float]]]]:
    out = {}
    for fam in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in fam.samples}
        out[fam.name] = (fam.type, fam.documentation, samples)
    return out


def test_same_exposition_as_prometheus_client(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for index in range(2):  # two writer processes, like two API servers
        subprocess.run([sys.executable, "-c", WRITER, str(index + 7), str(index)], env=env,
                       check=True)  # fmt: skip
    from headrace.metrics.multiproc import MultiProcessText

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    theirs = generate_latest(registry).decode()
    ours = MultiProcessText(str(tmp_path)).render().decode()
    assert _families(ours) == _families(theirs)
    assert sorted(ours.splitlines()) == sorted(theirs.splitlines())
    # a second render (cached keys) gives the same text
    assert MultiProcessText(str(tmp_path)).render().decode() == ours
