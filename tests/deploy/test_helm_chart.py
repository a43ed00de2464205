"""The Helm chart renders and lints offline, its manifests pass strict Kubernetes validation, and
its probe settings hold up when replayed against a real starting server."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import kubernetes_validate
import pytest
import yaml

from tests.e2e.server import ServerProcess, poll, stream_request

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "headrace"


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name="demo", namespace="serving")
    docs = {}
    for path, text in manifests.items():
        if path.endswith(".yaml") and text.strip():
            doc = yaml.safe_load(text)
            docs[doc["kind"]] = doc
    return docs


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return c


def test_chart_lints_and_validates_strictly() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
    for values in ({}, {"serviceMonitor": {"enabled": True}, "apiKey": {"secretName": "key"}}):
        docs = render(values)
        for kind in ("Deployment", "Service"):
            kubernetes_validate.validate(docs[kind], "1.33.0", strict=True)
    monitor = render({"serviceMonitor": {"enabled": True}})["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"  # a CRD: no upstream schema
    assert monitor["spec"]["endpoints"][0] == {
        "port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"
    }  # fmt: skip
    assert "ServiceMonitor" not in render()


def test_probes_grace_period_and_labels() -> None:
    docs = render({"shutdownTimeoutSeconds": 40, "preStopSleepSeconds": 7})
    pod = docs["Deployment"]["spec"]["template"]
    c = container(docs)
    assert c["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == 7
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 7 + 40 + 5
    args = c["args"]
    assert args[args.index("--shutdown-timeout") + 1] == "40"
    assert pod["metadata"]["labels"]["inference.networking.k8s.io/engine-type"] == "vllm"
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300  # room for big models
    assert (
        docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    )


def test_values_schema_rejects_bad_values() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        for bad in ({"port": "http"}, {"probes": {"liveness": {"periodSeconds": 0}}}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


@dataclass
class Probe:
    path: str
    period: float
    timeout: float
    failure_threshold: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Probe:
        return cls(
            spec["httpGet"]["path"],
            spec["periodSeconds"],
            spec["timeoutSeconds"],
            spec["failureThreshold"],
        )

    def run(self, url: str) -> bool:
        """The kubelet's rule for httpGet: success is a status in [200, 400) within timeout."""
        code = self.status(url)
        return code is not None and 200 <= code < 400

    def status(self, url: str) -> int | None:
        """The probe's HTTP status, or None where it got none (refused, timed out)."""
        try:
            return httpx.get(url + self.path, timeout=self.timeout).status_code
        except httpx.HTTPError:
            return None


@pytest.mark.slow
def test_kubelet_probe_schedule_against_a_starting_server() -> None:
    """Replay the kubelet: startup probe every period until it passes (a restart if it fails
    failureThreshold times in a row), then liveness and readiness on their periods."""
    c = container(render())
    startup, live, ready = (
        Probe.from_spec(c[k]) for k in ("startupProbe", "livenessProbe", "readinessProbe")
    )
    srv = ServerProcess(env={"HEADRACE_TEST_LOAD_DELAY": "8"})
    try:
        time.sleep(startup.period)  # the kubelet's first probe comes one period in
        failures = 0
        while (code := startup.status(srv.url)) is None or not 200 <= code < 400:
            failures += 1
            assert failures < startup.failure_threshold, "the kubelet would restart a loading pod"
            # The port is open from the first probe on: loading answers 503, not a refusal. (The
            # failed probe's own answer: a second request could find loading just finished.)
            if code is None:  # timed out under load: ask again, patiently
                code = httpx.get(srv.url + "/health/ready", timeout=10).status_code
            assert code == 503
            time.sleep(startup.period)
        assert failures >= 1  # it really was loading when the kubelet first looked
        # Ready only once /v1/models answers with a model.
        assert ready.run(srv.url)
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert models
        live_failures = 0
        next_live = next_ready = time.monotonic()
        end = time.monotonic() + 2 * max(live.period, ready.period)
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_live:
                live_failures = 0 if live.run(srv.url) else live_failures + 1
                assert live_failures < live.failure_threshold
                next_live += live.period
            if now >= next_ready:
                assert ready.run(srv.url)
                next_ready += ready.period
            time.sleep(0.1)
        # SIGTERM (after the preStop sleep) while a request streams: the very next readiness
        # probe fails -> NotReady, while liveness keeps passing so the drain can finish.
        events: list[dict[str, Any]] = []
        body = {"prompt": "A story:", "max_tokens": 100, "ignore_eos": True}
        worker = threading.Thread(target=stream_request, args=(srv.url, body, events))
        worker.start()
        poll(lambda: len(events) > 2, 30)
        srv.proc.send_signal(signal.SIGTERM)
        poll(lambda: httpx.get(srv.url + ready.path, timeout=ready.timeout).status_code == 503, 1)
        assert live.run(srv.url)
        worker.join(60)
        assert events[-1] == {"done": True}
    finally:
        assert srv.stop() == 0
