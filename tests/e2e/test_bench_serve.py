"""`headrace bench serve` against a real server: its report matches the server's own counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import matplotlib.image
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headrace.bench.report import PLOT_PANELS, Result, plot_result
from tests.e2e.server import ServerProcess, free_port

pytestmark = pytest.mark.slow


def server_counts(url: str) -> dict[str, float]:
    """Sum of each counter over its series (all finish reasons, all engines)."""
    totals: dict[str, float] = {}
    text = httpx.get(url + "/metrics", headers={"Cache-Control": "no-cache"}).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total"):
                totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def test_report_matches_server_counts(server: ServerProcess, tmp_path: Path) -> None:
    before = server_counts(server.url)
    result_file, plot_file = tmp_path / "result.json", tmp_path / "plot.png"
    proc = subprocess.run(
        [
            sys.executable, "-m", "headrace", "bench", "serve", "--base-url", server.url,
            "--endpoint", "/v1/chat/completions", "--num-prompts", "6",
            "--random-input-len", "40", "--random-output-len", "12", "--max-concurrency", "3",
            "--request-rate", "20", "--burstiness", "0.5", "--seed", "3",
            "--save-result", str(result_file), "--plot", str(plot_file), "--disable-tqdm",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Mean TTFT (ms):" in proc.stdout
    after = server_counts(server.url)
    result = json.loads(result_file.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    done = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    assert done == 6
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert result["total_output_tokens"] == generated == 6 * 12  # ignore_eos: exact lengths
    assert result["input_lens"] == [40] * 6  # token-exact prompts (the user message)
    prompt = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    assert prompt > result["total_input_tokens"]  # plus the chat template around each message
    assert len(result["ttfts"]) == len(result["itls"]) == 6
    assert all(len(itl) == 11 for itl in result["itls"])  # one chunk per token after the first
    for key in ("mean_ttft_ms", "p99_itl_ms", "median_tpot_ms", "mean_e2el_ms"):
        assert result[key] > 0

    image = matplotlib.image.imread(str(plot_file))
    assert image.shape[0] == 800 and image.shape[1] == 1200  # 12 x 8 in at 100 dpi


def test_plot_has_the_named_panels(tmp_path: Path) -> None:
    res = Result(
        model="m", endpoint="/v1/completions", duration=2.0, completed=2, failed=0,
        total_input_tokens=8, total_output_tokens=6, request_rate=float("inf"), burstiness=1.0,
        max_concurrency=None, percentiles=[99.0], input_lens=[4, 4], output_lens=[3, 3],
        ttfts=[0.1, 0.2], itls=[[0.05, 0.05], [0.06, 0.07]], e2els=[0.2, 0.33],
        errors=["", ""], token_times=[[0.1, 0.15, 0.2], [0.2, 0.26, 0.33]],
    )  # fmt: skip
    fig = plot_result(res, str(tmp_path / "p.png"))
    assert [ax.get_title() for ax in fig.axes] == list(PLOT_PANELS)


def test_unreachable_server_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "headrace", "bench", "serve", "--port", str(free_port()),
         "--num-prompts", "1", "--disable-tqdm"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot reach" in proc.stderr and "Traceback" not in proc.stderr
