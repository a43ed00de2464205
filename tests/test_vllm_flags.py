"""A `vllm serve` command line read as headrace's (headrace/vllm_flags.py)."""

from __future__ import annotations

import pytest

from headrace import vllm_flags
from headrace.api.protocol import ChatCompletionRequest
from headrace.config import SamplingDefaults

KNOWN = {"--max-num-seqs", "--enable-prefix-caching", "--no-enable-prefix-caching"}


def test_config_file_flags_come_first_so_the_command_line_wins(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: /m.gguf\n"
        "max_num_seqs: 8\n"
        "served-model-name: [a, b]\n"
        "enable_prefix_caching: false\n"
        "disable_log_stats: false\n"  # a plain switch at its default: nothing
        "headless: true\n"
        "compilation_config: {level: 3}\n"
        "seed: null\n"
    )
    got = vllm_flags.expand_config_file(
        ["--port", "9000", "--config", str(config), "--max-num-seqs", "4"], KNOWN
    )
    assert got == [
        "--model", "/m.gguf", "--max-num-seqs", "8", "--served-model-name", "a", "b",
        "--no-enable-prefix-caching", "--headless", "--compilation-config", '{"level": 3}',
        "--port", "9000", "--max-num-seqs", "4",
    ]  # fmt: skip
    assert vllm_flags.expand_config_file([f"--config={config}"], KNOWN)[:2] == [
        "--model",
        "/m.gguf",
    ]


def test_ignored_flags_go_with_their_values(caplog) -> None:
    argv = [
        "m.gguf", "--gpu-memory-utilization", "0.9", "-O3", "--max-num-seqs", "4",
        "--compilation-config={\"level\": 3}", "--enforce-eager", "--tensor-parallel-size", "1",
        "--data-parallel-backend=mp", "--port", "1",
    ]  # fmt: skip
    assert vllm_flags.strip_ignored(argv) == ["m.gguf", "--max-num-seqs", "4", "--port", "1"]
    assert "ignoring vLLM flag -O 3" in caplog.text
    assert "ignoring vLLM flag --gpu-memory-utilization 0.9" in caplog.text


@pytest.mark.parametrize(
    "argv",
    [
        ["--tensor-parallel-size", "2"],
        ["--pipeline-parallel-size=4"],
        ["--guided-decoding-backend", "outlines"],
        ["--data-parallel-backend", "ray"],
    ],
)
def test_values_headrace_cannot_honour_stop_it(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="is not supported"):
        vllm_flags.strip_ignored(argv)


def test_generation_config_defaults_as_vllm_reads_them(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(
        '{"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "do_sample": true, '
        '"eos_token_id": 2}'
    )
    got = vllm_flags.sampling_defaults(str(model), "auto", None)
    assert got == SamplingDefaults(temperature=0.6, top_p=0.9, max_tokens=7)
    merged = vllm_flags.sampling_defaults(str(model), "auto", '{"temperature": 0.2, "top_k": 5}')
    assert merged == SamplingDefaults(temperature=0.2, top_p=0.9, top_k=5, max_tokens=7)
    assert vllm_flags.sampling_defaults(str(model), "vllm", None) == SamplingDefaults()
    assert vllm_flags.sampling_defaults("/m.gguf", "auto", None) == SamplingDefaults()
    elsewhere = vllm_flags.sampling_defaults("/m.gguf", str(model), None)  # a directory of one
    assert elsewhere.temperature == 0.6
    for setting, overrides in [(str(tmp_path), None), ("auto", "[1]"), ("auto", '{"top_p": "x"}')]:
        with pytest.raises(SystemExit):
            vllm_flags.sampling_defaults(str(model), setting, overrides)


def test_a_field_left_out_takes_the_models_default() -> None:
    defaults = SamplingDefaults(temperature=0.6, top_k=20, max_tokens=7)
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    params = body.sampling_params(None, None, None, defaults)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.6, 20, 1.0, 7)
    given = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "temperature": 1.0, "top_k": 0}
    )
    params = given.sampling_params(3, None, None, defaults)
    assert (params.temperature, params.top_k, params.max_tokens) == (1.0, 0, 3)
