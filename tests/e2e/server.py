"""Start a real `headrace serve` subprocess on a free port and wait for it with a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def process_title(pid: int) -> str:
    """What `ps` shows for `pid` (setproctitle rewrites the command line); "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
    except OSError:
        return ""


class ServerProcess:
    """One `headrace serve` launcher (and its children) for a test."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="headrace-serve-", suffix=".log")[1])
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        cmd = [sys.executable, "-m", "headrace", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--uvicorn-log-level", "warning", *args]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env
        )

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def client(self, **kwargs: object) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def async_client(self, **kwargs: object) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=self.url + "/v1", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def children(self) -> list[int]:
        """PIDs whose parent is the launcher (engines and API servers)."""
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_bytes()
                except OSError:
                    continue
                fields = stat[stat.rfind(b")") + 2 :].split()
                if int(fields[1]) == self.proc.pid:
                    out.append(int(entry.name))
        return out

    def child_titled(self, role: str) -> int:
        """The launcher's child titled `headrace::<role>` (ApiServer_0, EngineCore_1, ...)."""
        for pid in self.children():
            if process_title(pid) == f"headrace::{role}":
                return pid
        raise LookupError(f"no child titled headrace::{role}")

    def titled_children(self, prefix: str) -> list[int]:
        """The launcher's children whose title starts with `headrace::<prefix>`."""
        return [p for p in self.children() if process_title(p).startswith(f"headrace::{prefix}")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return int(self.proc.returncode)


def engine_gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
            ):
                out[sample.name] = sample.value
    return out


def fresh_samples(url: str) -> list[Any]:
    """Every sample of a fresh (uncached) scrape on a new connection."""
    with httpx.Client(base_url=url) as c:
        text = c.get("/metrics", headers={"Cache-Control": "no-cache"}).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sum_by(url: str, name: str, label: str) -> dict[str, float]:
    """`name` summed per value of `label` (over API servers and the other labels)."""
    out: dict[str, float] = {}
    for s in fresh_samples(url):
        if s.name == name:
            out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    gauges: dict[str, float] = {}
    while time.monotonic() < deadline:
        gauges = engine_gauges(url)
        if len(gauges) == 3 and not any(gauges.values()):
            return gauges
        time.sleep(0.1)
    raise AssertionError(f"engine still busy after {timeout} s: {gauges}")


def poll(fn: Any, timeout: float, interval: float = 0.05) -> Any:
    """Call fn until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def stream_request(url: str, body: dict[str, Any], out: list[dict[str, Any]]) -> None:
    """POST a streaming completion; append every event (and a final {'done': True})."""
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as resp,
    ):
        out.append({"status": resp.status_code})
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                out.append({"done": True})
            elif line.startswith("data: "):
                out.append(json.loads(line[6:]))
