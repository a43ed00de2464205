"""The Prometheus config, alert rules and Grafana dashboard work against a real Prometheus
(Debian's package, unpacked with dpkg-deb) scraping a live headrace under load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from headrace import envs
from tests.e2e.server import ServerProcess, free_port, poll

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "headrace.json"
COMPARISON = re.compile(r"^(?P<query>.*?)\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.S)


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """prometheus and promtool from Debian's package, downloaded once into the cache dir."""
    root = envs.cache_dir() / "prometheus-deb"
    binary = root / "usr" / "bin" / "prometheus"
    if not binary.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, check=True,
                           capture_output=True)  # fmt: skip
            deb = next(Path(tmp).glob("prometheus_*.deb"))
            staging = Path(tmp) / "x"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
            root.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)
            shutil.move(str(staging), str(root))
    return binary.parent


def promtool(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "promtool"), *args], capture_output=True, text=True, cwd=RULES.parent
    )


def test_promtool_checks_and_rule_tests(prometheus_bin: Path) -> None:
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml"),
                 ("check", "config", "prometheus.yml")):  # fmt: skip
        proc = promtool(prometheus_bin, *args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("E2E request latency", "Time to first token", "Inter-token latency",
                   "Time per output token (per request)", "Token throughput", "Scheduler state",
                   "KV cache usage", "Prompt length", "Generation length", "Finish reasons",
                   "Queue, prefill and decode time (mean)", "Server state",
                   "Event-loop lag (p99)"):  # fmt: skip
        assert needed in titles, needed
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "30s")
            out.append((panel["title"], expr.replace("$model_name", ".*")))
    return out


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    out = []
    for rule in rules:
        m = COMPARISON.match(rule["expr"])
        assert m is not None, rule["expr"]
        out.append((rule["alert"], m.group("query").replace("[5m]", "[30s]")))
    return out


@pytest.fixture()
def live_prometheus(prometheus_bin: Path, server: ServerProcess, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "headrace",
            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
        }],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [str(prometheus_bin / "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, 60, 0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def query(prom: str, expr: str) -> list[dict[str, object]]:
    resp = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    result: list[dict[str, object]] = resp["data"]["result"]
    return result


@pytest.mark.slow
def test_dashboard_and_alert_queries_return_data(
    server: ServerProcess, live_prometheus: str
) -> None:
    stop = threading.Event()

    def load() -> None:
        client = server.client()
        i = 0
        while not stop.is_set():
            client.completions.create(
                model="SmolLM2-135M-Instruct", prompt=f"Fact {i % 3}:", max_tokens=6,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            i += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # two scrapes with traffic between them
            if query(
                live_prometheus, "sum(increase(vllm:e2e_request_latency_seconds_count[30s])) > 0"
            ):
                break
            time.sleep(1)
        queries = dashboard_queries() + alert_queries()
        missing = queries
        deadline = time.monotonic() + 30
        while missing and time.monotonic() < deadline:  # rate windows fill as scrapes arrive
            time.sleep(1)
            missing = [(n, e) for n, e in missing if not _has_number(query(live_prometheus, e))]
        assert not missing, missing
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def _has_number(result: list[dict[str, object]]) -> bool:
    """At least one series with a real (not NaN) value."""
    for series in result:
        value = series.get("value")
        if isinstance(value, list) and value[1] not in ("NaN", "+Inf", "-Inf"):
            return True
    return False
