"""What a 20 Hz /metrics scraper (the GIE endpoint picker's rate) costs served throughput.

    .venv/bin/python benchmarks/metrics_overhead.py [--users 16] [--rounds 3]

One `headrace serve` (default flags); alternating rounds of the same `headrace bench serve`
workload without and with a separate process fetching /metrics every 50 ms over one keep-alive
connection; reports the median output tok/s of each and their ratio, plus the scrape latency.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from threading import Event

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from headrace.bench.serve import add_bench_serve_args, run_benchmark
from tests.e2e.server import ServerProcess


def scraper(port: int, stop: Event, latencies: list[float]) -> None:
    """A separate process, like a router on another host: a raw keep-alive HTTP/1.1 client
    (no HTTP library, so the scraper's own CPU stays small on this 2-core machine)."""
    request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        f = sock.makefile("rb")
        next_at = time.perf_counter()
        while not stop.is_set():
            t0 = time.perf_counter()
            sock.sendall(request)
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
            latencies.append(time.perf_counter() - t0)
            next_at += 0.05
            time.sleep(max(0.0, next_at - time.perf_counter()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_per_scrape(srv: ServerProcess, count: int = 400) -> float:
    """API-server CPU seconds per /metrics scrape at 20 Hz on an idle server (deterministic,
    unlike throughput on a shared machine)."""
    api = srv.child_named("hr-api-")
    with multiprocessing.Manager() as manager:
        stop, lat = manager.Event(), manager.list()
        before = cpu_seconds(api)
        proc = multiprocessing.Process(target=scraper, args=(srv.port, stop, lat))
        proc.start()
        while len(lat) < count:
            time.sleep(0.2)
        stop.set()
        proc.join(10)
        return (cpu_seconds(api) - before) / len(lat)


def one_round(url: str, args: argparse.Namespace) -> float:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    bench_args = parser.parse_args(
        ["--base-url", url, "--num-prompts", str(args.num_prompts),
         "--random-input-len", "128", "--random-output-len", "128",
         "--max-concurrency", str(args.users), "--disable-tqdm", "--seed", "1"]
    )  # fmt: skip
    result = asyncio.run(run_benchmark(bench_args))
    assert result.failed == 0, result.errors
    return result.output_throughput


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    srv = ServerProcess("--disable-log-requests", "--disable-log-stats").wait_ready()
    plain: list[float] = []
    scraped: list[float] = []
    latencies: list[float] = []
    try:
        one_round(srv.url, argparse.Namespace(users=args.users, num_prompts=8))  # warm-up
        api = srv.child_named("hr-api-")
        t0, c0 = time.monotonic(), cpu_seconds(api)
        time.sleep(10)
        baseline = (cpu_seconds(api) - c0) / (time.monotonic() - t0)  # idle API server CPU/s
        per_scrape = cpu_per_scrape(srv)
        print(
            f"API server CPU: idle {1e3 * baseline:.1f} ms/s; with 20 Hz scrapes "
            f"{1e3 * (per_scrape - baseline * 0.05):.2f} ms per scrape above idle "
            f"= {100 * 20 * (per_scrape - baseline * 0.05):.2f}% of one core"
        )
        for r in range(args.rounds):
            plain.append(one_round(srv.url, args))
            with multiprocessing.Manager() as manager:
                stop, lat = manager.Event(), manager.list()
                proc = multiprocessing.Process(target=scraper, args=(srv.port, stop, lat))
                proc.start()
                try:
                    scraped.append(one_round(srv.url, args))
                finally:
                    stop.set()
                    proc.join(10)
                latencies.extend(lat)
            print(f"round {r}: without {plain[-1]:.1f} tok/s, with 20 Hz scraper {scraped[-1]:.1f}")
    finally:
        srv.stop()
    a, b = statistics.median(plain), statistics.median(scraped)
    lat = sorted(latencies)
    print(f"\nmedian output tok/s: without {a:.1f}, with 20 Hz /metrics {b:.1f} "
          f"({100 * (b - a) / a:+.1f}%)")  # fmt: skip
    print(f"/metrics latency: p50 {1e3 * lat[len(lat) // 2]:.1f} ms, "
          f"p99 {1e3 * lat[int(0.99 * len(lat))]:.1f} ms over {len(lat)} scrapes")  # fmt: skip


if __name__ == "__main__":
    main()
