"""Soak: minutes of mixed traffic, then check that everything went back to where it started.

    python benchmarks/soak.py [--minutes 10] [--concurrency 8] [--api-servers 2] [--seed 0]

Traffic, chosen at random per request: streaming and non-streaming completions and chat
completions, streams the client cancels after a few chunks, and bad requests (malformed JSON,
an unknown model, a prompt over the context, wrong types, a header overflow). Before the load
(after a warm-up) and after it (once idle), it records for every process of the server (the
launcher, its children and theirs: API servers, engines, body decoders) the resident memory
and open file descriptors, and the server's KV blocks in use and queue lengths. Prints those
side by side with the verdict, and the outcomes by kind of request. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.server import (  # noqa: E402
    ServerProcess,
    fresh_samples,
    process_title,
    wait_idle,
)

PROMPTS = ["Once upon a time", "The capital of France is", "List three colors:", "def fib(n):"]
RSS_SLACK = 1.15  # end RSS within 15% of start (allocator caches, the tokenizer's lazy state)
RSS_SLACK_MIB = 24


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def footprint(root: int) -> dict[str, tuple[float, int]]:
    """Per process (by title): (resident MiB, open fds)."""
    out = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in descendants(root):
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page / 2**20
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        name = process_title(pid).removeprefix("headrace::") or str(pid)
        if pid == root:
            name = "launcher"
        elif b"resource_tracker" in cmdline:
            name = "resource_tracker"
        out[name] = (rss, fds)
    return out


def server_levels(url: str) -> dict[str, float]:
    """KV blocks in use, waiting and running requests (summed over engines)."""
    usage, blocks = 0.0, 0.0
    out = {"running": 0.0, "waiting": 0.0}
    for s in fresh_samples(url):
        if s.name == "vllm:kv_cache_usage_perc":
            usage += s.value
        elif s.name == "vllm:cache_config_info":
            blocks = float(s.labels.get("num_gpu_blocks", 0))
        elif s.name == "vllm:num_requests_running":
            out["running"] += s.value
        elif s.name == "vllm:num_requests_waiting":
            out["waiting"] += s.value
    out["kv_blocks_in_use"] = round(usage * blocks)
    return out


BAD: list[tuple[str, dict[str, Any]]] = [
    ("bad json", {"content": b'{"prompt": ', "path": "/v1/completions"}),
    ("unknown model", {"json": {"model": "nope", "prompt": "hi"}, "path": "/v1/completions"}),
    ("wrong type", {"json": {"prompt": "hi", "max_tokens": "x"}, "path": "/v1/completions"}),
    ("too long", {"json": {"prompt": "hello " * 5000}, "path": "/v1/completions"}),
    ("empty messages", {"json": {"messages": []}, "path": "/v1/chat/completions"}),
    (
        "header overflow",
        {"json": {"prompt": "hi"}, "path": "/v1/completions", "headers": {"x-big": "a" * 40000}},
    ),
]


class Load:
    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def count(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[f"{kind}: {outcome}"] += 1

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        roll = rng.random()
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        prompt = rng.choice(PROMPTS)
        body: dict[str, Any] = (
            {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        )
        body["max_tokens"] = rng.randint(4, 48)
        try:
            if roll < 0.3:
                kind = "stream"
                with client.stream("POST", path, json={**body, "stream": True}) as resp:
                    done = any(line == "data: [DONE]" for line in resp.iter_lines())
                self.count(kind, f"{resp.status_code}{'' if done else ' (no [DONE])'}")
            elif roll < 0.6:
                kind = "json"
                resp = client.post(path, json=body)
                self.count(kind, str(resp.status_code))
            elif roll < 0.8:
                kind = "cancelled"
                body["max_tokens"] = 200
                with client.stream("POST", path, json={**body, "stream": True}) as resp:
                    for i, _ in enumerate(resp.iter_lines()):
                        if i >= rng.randint(1, 6):
                            break
                self.count(kind, f"{resp.status_code} closed early")
            else:
                name, spec = rng.choice(BAD)
                kind = f"bad ({name})"
                resp = client.post(
                    spec["path"],
                    json=spec.get("json"),
                    content=spec.get("content"),
                    headers={"content-type": "application/json", **spec.get("headers", {})},
                )
                ok = "error" in json.loads(resp.content or b"{}")
                self.count(kind, f"{resp.status_code}{'' if ok else ' (no error body)'}")
        except httpx.HTTPError as exc:
            self.count("transport", type(exc).__name__)

    def worker(self, index: int, deadline: float) -> None:
        rng = random.Random(self.rng.random() + index)
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                self.one(client, rng)


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    problems = []
    for name, (rss0, fds0) in sorted(before["processes"].items()):
        rss1, fds1 = after["processes"].get(name, (float("nan"), -1))
        flag = ""
        if not rss1 <= max(rss0 * RSS_SLACK, rss0 + RSS_SLACK_MIB):
            flag += " RSS GREW"
        if fds1 != fds0:
            flag += " FDS CHANGED"
        if flag:
            problems.append(name + flag)
        print(f"  {name:18s} RSS {rss0:7.1f} -> {rss1:7.1f} MiB   fds {fds0:4d} -> {fds1:4d}{flag}")
    gone = set(after["processes"]) ^ set(before["processes"])
    if gone:
        problems.append(f"processes differ: {sorted(gone)}")
    for key, v0 in before["server"].items():
        v1 = after["server"][key]
        print(f"  {key:18s} {v0:g} -> {v1:g}")
        if v1 != v0:
            problems.append(f"{key} {v0:g} -> {v1:g}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--api-servers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    srv = ServerProcess(
        "--api-server-count", str(args.api_servers), "--disable-log-requests",
        "--max-model-len", "2048",
    ).wait_ready()  # fmt: skip
    try:
        load = Load(srv.url, args.seed)
        load.worker(0, time.monotonic() + 20)  # warm-up: lazy state, allocator pools
        wait_idle(srv.url, 60)
        time.sleep(3)
        before = {"processes": footprint(srv.proc.pid), "server": server_levels(srv.url)}
        load.outcomes.clear()
        deadline = time.monotonic() + args.minutes * 60
        t0 = time.monotonic()
        threads = [
            threading.Thread(target=load.worker, args=(i, deadline))
            for i in range(args.concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        wait_idle(srv.url, 120)
        time.sleep(5)  # the engines' last reports, the decoders' queues
        after = {"processes": footprint(srv.proc.pid), "server": server_levels(srv.url)}
        total = sum(load.outcomes.values())
        print(f"soak: {total} requests in {took:.0f} s, concurrency {args.concurrency}")
        for outcome, n in sorted(load.outcomes.items()):
            print(f"  {outcome:40s} {n}")
        print("start -> end:")
        problems = compare(before, after)
        print("verdict:", "back to the start levels" if not problems else "; ".join(problems))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
