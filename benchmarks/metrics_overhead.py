"""What a 20 Hz /metrics scraper (the GIE endpoint picker's rate) costs served throughput.

    .venv/bin/python benchmarks/metrics_overhead.py [--users 16] [--windows 100] [--window-s 3]

One `headrace serve` (default flags) under a steady `headrace bench serve` load (`--users`
streams kept busy for the whole run, 64-192 in and out, so the streams do not move in
lock-step). A separate process fetches /metrics every 50 ms over one keep-alive connection
during every other measurement window, in the order off, on, on, off, ... Each window's
throughput is the server's own generation-token counter over the window, read at each edge.

Many short windows rather than a few long ones: on this shared 2-core machine throughput
drifts by +-15% over tens of seconds, far more than the effect measured. Switching every few
seconds puts both conditions under the same drift, and a few hundred windows average the
fast noise down. Reported: the change in throughput (total tokens over total time, per
condition) with a 95% bootstrap interval over the off/on pairs, the median paired change,
each process's CPU per condition, the scrape latency, and the API server's CPU per scrape
measured on an idle server.

The scraper runs as SCHED_IDLE by default: on this 2-core machine a normal-priority 20 Hz
client preempts one of the engine's two OpenMP threads at each wake-up, a cost that belongs to
where the scraper runs, not to /metrics (a router scrapes from its own host). The API server
that answers the scrapes keeps its normal priority. `--scraper-on-server-cores` measures the
other case too.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from threading import Event
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from headrace.bench.serve import add_bench_serve_args, run_benchmark
from headrace.model.loader import bundled_model_path
from tests.e2e.server import ServerProcess


class Scrape:
    """GET /metrics over one keep-alive connection, reopened when the server closed it
    (uvicorn drops connections idle for 5 s)."""

    def __init__(self, port: int, headers: bytes = b"") -> None:
        self.port = port
        self.request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n"
        self.sock: socket.socket | None = None
        self.f: Any = None

    def get(self) -> bytes:
        for _ in range(2):
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                self.f = self.sock.makefile("rb")
            try:
                self.sock.sendall(self.request)
                if (status := self.f.readline()) == b"":
                    raise ConnectionError("closed")
                assert b" 200 " in status, status
                length = 0
                while (line := self.f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                return bytes(self.f.read(length))
            except (ConnectionError, BrokenPipeError):
                self.sock.close()
                self.sock = None
        raise ConnectionError("/metrics: connection closed twice")


def scraper(
    port: int, active: Event, stop: Event, latencies: list[float], idle_class: bool
) -> None:
    """A separate process, like a router on another host: a raw keep-alive HTTP/1.1 client
    (no HTTP library, so the scraper's own CPU stays small on this 2-core machine).
    Scrapes at 20 Hz while `active` is set. With `idle_class` it runs as SCHED_IDLE: it
    only gets a core nobody else wants, so its own wake-ups never preempt the engine, as a
    router on another host's cores would not; the API server's work is unchanged."""
    if idle_class:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    scrape = Scrape(port)
    next_at = time.perf_counter()
    while not stop.is_set():
        if not active.wait(0.1):
            next_at = time.perf_counter()
            continue
        t0 = time.perf_counter()
        scrape.get()
        latencies.append(time.perf_counter() - t0)
        next_at += 0.05
        time.sleep(max(0.0, next_at - time.perf_counter()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def generated_tokens(scrape: Scrape) -> float:
    """The server's generation-token total (scraped with Cache-Control: no-cache)."""
    body = scrape.get()
    return sum(
        float(line.rsplit(b" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(b"vllm:generation_tokens_total{")
    )


def load(url: str, users: int) -> None:
    """Keeps `users` streams busy until terminated (prompts made with the local tokenizer)."""
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    args = parser.parse_args(
        ["--base-url", url, "--num-prompts", "3000", "--tokenizer", str(bundled_model_path()),
         "--random-input-len", "128", "--random-output-len", "128", "--random-range-ratio", "0.5",
         "--max-concurrency", str(users), "--disable-tqdm", "--seed", "1"]
    )  # fmt: skip
    asyncio.run(run_benchmark(args))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--windows", type=int, default=100, help="per condition")
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--settle-s", type=float, default=0.3, help="after each switch")
    p.add_argument("--verbose", action="store_true", help="print every window")
    p.add_argument(
        "--scraper-on-server-cores",
        action="store_true",
        help="run the scraper at normal priority, competing with the engine for this machine's "
        "cores (default: SCHED_IDLE, standing in for a router on another host)",
    )
    args = p.parse_args()
    idle_class = not args.scraper_on_server_cores
    print(f"scraper scheduling: {'SCHED_IDLE' if idle_class else 'normal'}")
    srv = ServerProcess("--disable-log-requests", "--disable-log-stats").wait_ready()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        active, stop, lat = manager.Event(), manager.Event(), manager.list()
        scrape = ctx.Process(target=scraper, args=(srv.port, active, stop, lat, idle_class))
        loader = ctx.Process(target=load, args=(srv.url, args.users))
        try:
            api = srv.child_titled("ApiServer_0")
            scrape.start()
            # API-server CPU per scrape, on the idle server: deterministic, unlike throughput.
            t0, c0 = time.monotonic(), cpu_seconds(api)
            time.sleep(10)
            idle = (cpu_seconds(api) - c0) / (time.monotonic() - t0)
            active.set()
            time.sleep(1)
            n0, t0, c0 = len(lat), time.monotonic(), cpu_seconds(api)
            time.sleep(20)
            active.clear()
            per_scrape = ((cpu_seconds(api) - c0) - idle * (time.monotonic() - t0)) / (
                len(lat) - n0
            )
            print(
                f"API server CPU: idle {1e3 * idle:.1f} ms/s; {1e3 * per_scrape:.2f} ms per "
                f"scrape above idle = {100 * 20 * per_scrape:.2f}% of one core at 20 Hz"
            )
            del lat[:]

            loader.start()
            counter = Scrape(srv.port, b"Cache-Control: no-cache\r\n")
            while generated_tokens(counter) == 0:  # prompts being made
                assert loader.is_alive(), "the load generator died"
                time.sleep(1)
            time.sleep(20)  # ramp up
            names = ["engine", "api server", "load generator", "scraper"]
            assert loader.pid is not None and scrape.pid is not None
            pids = [srv.child_titled("EngineCore_0"), api, loader.pid, scrape.pid]
            tokens: dict[bool, list[float]] = {False: [], True: []}
            seconds: dict[bool, list[float]] = {False: [], True: []}
            cpu_sum = {False: [0.0] * len(pids), True: [0.0] * len(pids)}
            for w in range(2 * args.windows):
                on = w % 4 in (1, 2)  # off, on, on, off, off, on, on, off, ...
                if on:
                    active.set()
                else:
                    active.clear()
                time.sleep(args.settle_s)  # the scraper notices within 0.1 s
                cpu0 = [cpu_seconds(pid) for pid in pids]
                g0, t0 = generated_tokens(counter), time.monotonic()
                time.sleep(args.window_s)
                g1, t1 = generated_tokens(counter), time.monotonic()
                tokens[on].append(g1 - g0)
                seconds[on].append(t1 - t0)
                for i, (pid, c) in enumerate(zip(pids, cpu0, strict=True)):
                    cpu_sum[on][i] += cpu_seconds(pid) - c
                if args.verbose:
                    print(f"window {w:3d} scraper {'on ' if on else 'off'}: "
                          f"{(g1 - g0) / (t1 - t0):6.1f} tok/s")  # fmt: skip
            assert loader.is_alive(), "the load generator died"
            for on in (False, True):
                total_s = sum(seconds[on])
                print(
                    f"scraper {'on ' if on else 'off'}: CPU "
                    + ", ".join(
                        f"{n} {100 * c / total_s:.0f}%"
                        for n, c in zip(names, cpu_sum[on], strict=True)
                    )
                )
        finally:
            stop.set()
            active.set()
            loader.terminate()
            scrape.join(10)
            srv.stop()
        latencies = sorted(lat)
    # Window i of each condition belongs to pair i (one off and one on window, adjacent).
    pairs = list(zip(tokens[False], seconds[False], tokens[True], seconds[True], strict=True))

    def change(sample: list[tuple[float, float, float, float]]) -> float:
        """Throughput with the scraper over throughput without, minus 1: totals over windows."""
        off = sum(p[0] for p in sample) / sum(p[1] for p in sample)
        return sum(p[2] for p in sample) / sum(p[3] for p in sample) / off - 1

    rng = random.Random(0)
    boot = sorted(change(rng.choices(pairs, k=len(pairs))) for _ in range(2000))
    low, high = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot))]
    a = sum(tokens[False]) / sum(seconds[False])
    b = sum(tokens[True]) / sum(seconds[True])
    per_pair = [p[2] / p[3] / (p[0] / p[1]) - 1 for p in pairs]
    print(
        f"\noutput tok/s over {len(pairs)} pairs of {args.window_s:g} s windows: without {a:.1f}, "
        f"with 20 Hz /metrics {b:.1f}: {100 * change(pairs):+.2f}% "
        f"(95% bootstrap interval {100 * low:+.2f}% .. {100 * high:+.2f}%; "
        f"median paired change {100 * statistics.median(per_pair):+.2f}%, "
        f"window spread {100 * statistics.pstdev(per_pair):.1f}%)"
    )
    p50, p99 = (1e3 * latencies[int(q * len(latencies))] for q in (0.5, 0.99))
    print(f"/metrics latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(latencies)} scrapes")


if __name__ == "__main__":
    main()
