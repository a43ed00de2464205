"""headrace vs llama.cpp's llama-server on the same GGUF, same workload, one invocation.

    .venv/bin/python benchmarks/compare_peers.py [--users 1,16,64] [--llama-server PATH]
        [--headrace-args "--kv-cache-dtype bfloat16"]

Run by hand (not in CI). Without --llama-server it builds `llama-server` from the llama.cpp
vendored in the `llama-cpp-python` source package on PyPI (cmake + a C++ compiler; ~8 minutes
on 2 cores the first time, then cached under HEADRACE_CACHE_DIR/llama.cpp/) for this CPU's
vector instructions: AVX-512 (with VNNI and BF16 where the CPU has them) or AVX2, never AMX (a
-march=native build dies with SIGILL where the VM does not grant AMX tile state). Each server runs
alone: headrace first (`headrace serve`, default flags plus --headrace-args), then llama-server
with continuous batching (`-np` = users, `-t` = cores, one KV slot per user, no unified KV cache;
its KV cache is float16, its default). The load is
`headrace bench serve` logic with the bundled model's tokenizer (so both get identical
prompts): --input-len-token prompts, --output-len tokens (ignore_eos), streaming completions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

from headrace import envs
from headrace.bench.report import Result
from headrace.bench.serve import add_bench_serve_args, run_benchmark
from headrace.model.backend import cpu_flags
from headrace.model.loader import bundled_model_path
from tests.e2e.server import ServerProcess, free_port


def on(flag: bool) -> str:
    return "ON" if flag else "OFF"


def build_llama_server(version: str | None) -> Path:
    """llama-server from llama-cpp-python's sdist (cached by version)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = "llama-cpp-python" + (f"=={version}" if version else "")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--quiet", "-d", tmp, spec],
            check=True,
        )  # fmt: skip
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        name = sdist.name.removesuffix(".tar.gz")
        flags = cpu_flags()
        isa = "avx512" if "avx512f" in flags else "avx2"
        out = envs.cache_dir() / "llama.cpp" / f"{name}-{isa}" / "llama-server"
        if out.is_file():
            return out
        print(f"building llama-server from {sdist.name} (several minutes)...", file=sys.stderr)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / name / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        subprocess.run(
            ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_TESTS=OFF",
             # Not -march=native: its AMX kernels die with SIGILL in VMs that do not grant
             # AMX tile state; the CPU's AVX-512 or AVX2 is the fair comparison.
             "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             f"-DGGML_AVX512={on(isa == 'avx512')}",
             f"-DGGML_AVX512_VNNI={on('avx512_vnni' in flags)}",
             f"-DGGML_AVX512_BF16={on('avx512_bf16' in flags)}",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            check=True,
        )  # fmt: skip
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j",
                        str(os.cpu_count() or 2)], check=True)  # fmt: skip
        binary = next(build.rglob("llama-server"))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, out)
        return out


def bench(url: str, users: int, args: argparse.Namespace) -> Result:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    bench_args = parser.parse_args(
        ["--base-url", url, "--num-prompts", str(max(4, 2 * users)),
         "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
         "--max-concurrency", str(users), "--num-warmups", "1", "--disable-tqdm",
         "--tokenizer", str(bundled_model_path()), "--seed", "0"]
    )  # fmt: skip
    result = asyncio.run(run_benchmark(bench_args))
    assert result.failed == 0, [e for e in result.errors if e][:3]
    return result


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("llama-server did not become ready")


def run_llama(binary: Path, users: int, args: argparse.Namespace) -> Result:
    port = free_port()
    ctx = users * (args.input_len + args.output_len + 64)
    cmd = [str(binary), "-m", str(bundled_model_path()), "--host", "127.0.0.1", "--port",
           str(port), "-t", str(os.cpu_count() or 2), "-np", str(users), "-c", str(ctx),
           "-cb", "--no-kv-unified"]  # fmt: skip
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    if "--no-kv-unified" not in help_text:
        cmd.remove("--no-kv-unified")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        return bench(url, users, args)
    finally:
        proc.terminate()
        proc.wait(30)


def row(r: Result) -> str:
    a = r.aggregates
    return (
        f"{r.output_throughput:.1f} | {a['median_ttft_ms'] / 1000:.2f} s | "
        f"{a['median_tpot_ms']:.1f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", default="1,16,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--llama-server", default=None, help="use this binary instead of building")
    p.add_argument("--llama-cpp-python-version", default=None, help="sdist to build from")
    p.add_argument("--headrace-args", default="", help="more `headrace serve` flags, one string")
    args = p.parse_args()
    users = [int(u) for u in args.users.split(",")]
    binary = (
        Path(args.llama_server)
        if args.llama_server
        else build_llama_server(args.llama_cpp_python_version)
    )
    ours: dict[int, Result] = {}
    flags = shlex.split(args.headrace_args)
    srv = ServerProcess("--disable-log-requests", "--disable-log-stats", *flags).wait_ready()
    chosen = [ln for ln in srv.log_tail(400).splitlines() if "compute backend" in ln]
    backend = chosen[-1].split("compute backend")[-1] if chosen else "(backend?)"
    print(f"headrace {backend}; flags: {' '.join(flags) or '(defaults)'}")
    try:
        for u in users:
            ours[u] = bench(srv.url, u, args)
            print(f"headrace     users={u:<3} {row(ours[u])}", flush=True)
    finally:
        srv.stop()
    theirs: dict[int, Result] = {}
    for u in users:
        theirs[u] = run_llama(binary, u, args)
        print(f"llama-server users={u:<3} {row(theirs[u])}", flush=True)
    print(
        f"\n{args.input_len}-token prompts, {args.output_len} output tokens, streaming; "
        "TTFT and TPOT are medians\n"
    )
    print("| users | headrace tok/s | TTFT | TPOT | llama-server tok/s | TTFT | TPOT | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for u in users:
        ratio = ours[u].output_throughput / max(1e-9, theirs[u].output_throughput)
        print(f"| {u} | {row(ours[u])} | {row(theirs[u])} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
