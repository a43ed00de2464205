"""Chaos run: mixed load on 2 API servers x 2 engines while a random engine or API server is
killed (SIGKILL, found by its process title) every 30-60 s.

    python benchmarks/chaos.py [--minutes 10] [--concurrency 8] [--seed 0]

Reports requests served, failed as the client saw them (an error event, 503, a broken
connection), re-sent and lost (the server's counters), p50/p99 TTFT of the streams, the
restarts by process and reason, and whether KV usage, open file descriptors and resident
memory per process role went back to their levels before the run once the load stopped.
Not part of CI: it takes `--minutes` plus start-up and settling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.server import ServerProcess, poll, process_title  # noqa: E402

ROLES = ("ApiServer_0", "ApiServer_1", "EngineCore_0", "EngineCore_1")


def metric_sums(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Cache-Control": "no-cache"}, timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name
            if s.name.endswith("_restarts_total"):
                who = s.labels.get("engine") or f"api{s.labels.get('api_server')}"
                key = f"{s.name}[{who},{s.labels['reason']}]"
            out[key] = out.get(key, 0.0) + s.value
    return out


def footprint(srv: ServerProcess) -> dict[str, tuple[int, int]]:
    """Per role: (open fds, resident MiB), from /proc."""
    out = {}
    for pid in srv.children():
        role = process_title(pid).removeprefix("headrace::")
        if role in ROLES or role == "Coordinator":
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
                    "SC_PAGE_SIZE"
                )
            except OSError:
                continue
            out[role] = (fds, rss >> 20)
    return out


class Load:
    """`concurrency` threads sending a random mix until stopped; one record per request."""

    def __init__(self, url: str, concurrency: int, seed: int) -> None:
        self.url, self.stop = url, threading.Event()
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(random.Random(seed + i),), daemon=True)
            for i in range(concurrency)
        ]
        for t in self.threads:
            t.start()

    def _run(self, rng: random.Random) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                rec = self._one(client, rng)
                with self.lock:
                    self.records.append(rec)

    def _one(self, client: httpx.Client, rng: random.Random) -> dict[str, Any]:
        stream = rng.random() < 0.6
        chat = rng.random() < 0.5
        n = rng.randint(8, 64)
        if chat:
            path = "/v1/chat/completions"
            body: dict[str, Any] = {"messages": [{"role": "user", "content": f"Tell me {n}"}]}
        else:
            path, body = "/v1/completions", {"prompt": f"Story number {n}:"}
        body |= {"max_tokens": n, "ignore_eos": True, "stream": stream}
        start = time.monotonic()
        rec: dict[str, Any] = {"stream": stream, "start": start, "ok": False}
        try:
            if not stream:
                r = client.post(path, json=body)
                rec["status"] = r.status_code
                rec["ok"] = r.status_code == 200
                return rec
            with client.stream("POST", path, json=body) as r:
                rec["status"] = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        rec.setdefault("error", False)
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec["error"] = True
                    elif "ttft" not in rec and _has_text(event):
                        rec["ttft"] = time.monotonic() - start
            rec["ok"] = rec["status"] == 200 and rec.get("error") is False
        except httpx.HTTPError as exc:
            rec["status"], rec["exception"] = 0, type(exc).__name__
        rec["end"] = time.monotonic()
        return rec

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def _has_text(event: dict[str, Any]) -> bool:
    for c in event.get("choices", []):
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    srv = ServerProcess(
        "--api-server-count", "2", "--data-parallel-size", "2", "--max-engine-restarts", "50",
        "--max-model-len", "1024", "--kv-cache-memory", "256MiB", "--disable-log-requests",
    ).wait_ready(300)  # fmt: skip
    try:
        before_fp, before = footprint(srv), metric_sums(srv.url)
        load = Load(srv.url, args.concurrency, args.seed)
        end = time.monotonic() + 60 * args.minutes
        kills: list[str] = []
        while time.monotonic() < end:
            time.sleep(min(rng.uniform(30, 60), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            role = rng.choice(ROLES)
            try:
                os.kill(srv.child_titled(role), signal.SIGKILL)
                kills.append(role)
                print(f"{time.strftime('%H:%M:%S')} killed {role}", flush=True)
            except (LookupError, ProcessLookupError):
                print(f"{role} not running (restarting); no kill this round", flush=True)
        load.finish()
        poll(lambda: httpx.get(srv.url + "/health").json()["status"] == "ready", 180, 0.5)
        time.sleep(3)
        after, after_fp = metric_sums(srv.url), footprint(srv)
    finally:
        srv.stop()
    report(load.records, kills, before, after, before_fp, after_fp, args)
    return 0


def report(
    records: list[dict[str, Any]],
    kills: list[str],
    before: dict[str, float],
    after: dict[str, float],
    before_fp: dict[str, tuple[int, int]],
    after_fp: dict[str, tuple[int, int]],
    args: argparse.Namespace,
) -> None:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    ok = sum(r["ok"] for r in records)
    by_status: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            key = f"{r.get('status')}{' stream error' if r.get('error') else ''}"
            key += f" {r['exception']}" if "exception" in r else ""
            by_status[key] = by_status.get(key, 0) + 1
    ttfts = sorted(r["ttft"] for r in records if "ttft" in r)

    def p(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1000 if ttfts else 0.0

    print(f"\nchaos: {args.minutes:g} min, concurrency {args.concurrency}, seed {args.seed}")
    lines = [
        f"kills: {len(kills)} ({', '.join(f'{r} x{kills.count(r)}' for r in ROLES)})",
        f"requests: {len(records)} sent, {ok} served, {len(records) - ok} failed as the client "
        f"saw them {by_status}",
        f"server counters: re-sent {delta('vllm:headrace_requests_resent_total'):.0f}, lost "
        f"{delta('vllm:headrace_requests_lost_total'):.0f}, success "
        f"{delta('vllm:request_success_total'):.0f}",
        f"stream TTFT: p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms "
        f"(median {statistics.median(ttfts) * 1000 if ttfts else 0:.0f} ms)",
        "restarts: "
        + ", ".join(
            f"{k.split('[')[1].rstrip(']')} {v:.0f}"
            for k, v in sorted(after.items())
            if "_restarts_total[" in k and v
        ),
        f"KV usage after: {after.get('vllm:kv_cache_usage_perc', 0.0):.3f} (before "
        f"{before.get('vllm:kv_cache_usage_perc', 0.0):.3f})",
    ]
    for role in sorted(set(before_fp) | set(after_fp)):
        b, a = before_fp.get(role, (0, 0)), after_fp.get(role, (0, 0))
        lines.append(f"{role}: fds {b[0]} -> {a[0]}, RSS {b[1]} -> {a[1]} MiB")
    for line in lines:
        print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
