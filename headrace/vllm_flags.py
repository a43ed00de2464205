"""A `vllm serve` command line, run unchanged by `headrace serve`.

`headrace serve` takes vLLM's flag names for what it does. Before its own parser reads them:
- `--config FILE` (vLLM's YAML of flags, as a ConfigMap mounts it) becomes those flags, ahead of
  the command line's own, which win;
- flags of `vllm serve` that only tune what headrace does not have (GPU memory, CUDA graphs,
  compilation, Ray, downloads, tracing) are dropped with one warning each (IGNORED). Those
  whose value would change what a client gets must be at the one value headrace serves
  (MUST_BE); any other flag headrace does not know stays an error.

After parsing, `sampling_defaults` reads `--generation-config` and `--override-generation-config`
as vLLM does: the model's recommended sampling, for requests that leave those fields out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from headrace.config import SamplingDefaults

logger = logging.getLogger("headrace.cli")

# True: the flag takes a value
IGNORED: dict[str, bool] = {
    # memory, graphs and compilation on GPUs
    "--gpu-memory-utilization": True,
    "--enforce-eager": False,
    "--swap-space": True,
    "--cpu-offload-gb": True,
    "--num-gpu-blocks-override": True,
    "--max-seq-len-to-capture": True,
    "--cuda-graph-sizes": True,
    "--max-cudagraph-capture-size": True,
    "--compilation-config": True,
    "-O": True,
    "--async-scheduling": False,
    "--disable-cascade-attn": False,
    "--disable-sliding-window": False,
    "--disable-hybrid-kv-cache-manager": False,
    "--prefix-caching-hash-algo": True,
    "--enable-sleep-mode": False,
    # parallelism and loading machinery
    "--tensor-parallel-size": True,
    "--pipeline-parallel-size": True,
    "--distributed-executor-backend": True,
    "--disable-custom-all-reduce": False,
    "--disable-frontend-multiprocessing": False,
    "--max-parallel-loading-workers": True,
    "--data-parallel-backend": True,
    "--enable-expert-parallel": False,
    "--load-format": True,
    "--download-dir": True,
    "--revision": True,
    "--code-revision": True,
    "--tokenizer-revision": True,
    "--trust-remote-code": False,
    "--use-tqdm-on-load": False,
    "--model-impl": True,
    # the tokenizer comes from the model's own files (a GGUF's metadata, a directory's
    # tokenizer files); the quantization from its tensors' types
    "--tokenizer": True,
    "--tokenizer-mode": True,
    "--quantization": True,
    "-q": True,
    # scheduling knobs of vLLM's own scheduler (chunked prefill is always on here)
    "--enable-chunked-prefill": False,
    "--no-enable-chunked-prefill": False,
    "--max-num-partial-prefills": True,
    "--max-long-partial-prefills": True,
    "--long-prefill-token-threshold": True,
    "--max-logprobs": True,
    # structured outputs always run on xgrammar
    "--guided-decoding-backend": True,
    "--structured-outputs-config": True,
    # multimodal inputs (text-only models here)
    "--limit-mm-per-prompt": True,
    "--disable-mm-preprocessor-cache": False,
    # HTTP details: X-Request-Id is always echoed; headrace caps request lines and headers
    "--enable-request-id-headers": False,
    "--h11-max-incomplete-event-size": True,
    "--h11-max-header-count": True,
    # logging and tracing
    "--max-log-len": True,
    "--enable-log-requests": False,
    "--enable-log-outputs": False,
    "--log-error-stack": False,
    "--otlp-traces-endpoint": True,
    "--collect-detailed-traces": True,
    # always on here: usage's prompt_tokens_details (cached tokens), /load's count
    "--enable-prompt-tokens-details": False,
    "--enable-server-load-tracking": False,
}
# flags whose value must be the one headrace serves
MUST_BE = {
    "--tensor-parallel-size": "1",
    "--pipeline-parallel-size": "1",
    "--guided-decoding-backend": "xgrammar",
    "--data-parallel-backend": "mp",  # processes, as headrace runs them
}


def expand_config_file(argv: list[str], known: set[str]) -> list[str]:
    """`--config FILE`: the YAML mapping's flags first (`max_num_seqs: 8` is `--max-num-seqs 8`,
    `true` a bare flag, `false` its `--no-` twin where `known` has one, else nothing, a list
    several values), then the rest of `argv`, so the command line wins where both set a flag.
    Raises SystemExit for a file that is not such a mapping."""
    out: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name != "--config":
            rest.append(argv[i])
        else:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit("headrace serve: --config needs a file")
                value = argv[i + 1]
                i += 1
            out += _config_flags(Path(value), known)
        i += 1
    return out + rest


def _config_flags(path: Path, known: set[str]) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"headrace serve: --config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"headrace serve: --config {path}: expected a mapping of flags")
    flags: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        flags += _flag_values(flag, value, known)
    return flags


def _flag_values(flag: str, value: Any, known: set[str]) -> list[str]:
    if value is True:
        return [flag]
    if value is False:
        negated = "--no-" + flag[2:]
        return [negated] if negated in known else []
    if value is None:
        return []
    if isinstance(value, list):
        return [flag, *(str(v) for v in value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def strip_ignored(argv: list[str]) -> list[str]:
    """`argv` without the IGNORED flags (and their values), each dropped with a warning; a
    MUST_BE flag at another value is a SystemExit."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name[:2] == "-O" and name[2:].isdigit():  # -O3: the level attached
            name, eq, value = "-O", "=", name[2:]
        if name not in IGNORED:
            out.append(argv[i])
            i += 1
            continue
        takes_value = IGNORED[name]
        if takes_value and not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        wanted = MUST_BE.get(name)
        if wanted is not None and value.strip() != wanted:
            raise SystemExit(f"headrace serve: {name} {value} is not supported (only {wanted})")
        logger.warning(
            "ignoring vLLM flag %s%s: it has no meaning for headrace",
            name, f" {value}" if takes_value else "",
        )  # fmt: skip
        i += 1
    return out


_GENERATION_FILE = "generation_config.json"
# its keys that become request defaults (vLLM's set), and their fields
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(model: str | None, setting: str, overrides: str | None) -> SamplingDefaults:
    """vLLM's `--generation-config`: `auto` reads MODEL's generation_config.json (an HF
    directory's; a GGUF file has none), `vllm` reads none, anything else is a directory holding
    one. `--override-generation-config` (a JSON object) is merged over it. Raises SystemExit for
    a file or value that cannot be read."""
    if setting == "vllm":
        where = None
    elif setting == "auto":  # an HF directory's file; a GGUF file (or no MODEL) has none
        where = Path(model) / _GENERATION_FILE if model else None
    else:
        where = Path(setting) / _GENERATION_FILE
        if not where.is_file():
            raise SystemExit(
                f"headrace serve: --generation-config {setting}: no {_GENERATION_FILE}"
            )
    found = _read_json(where, "--generation-config") if where and where.is_file() else {}
    if overrides:
        found.update(_read_json_text(overrides, "--override-generation-config"))
    values: dict[str, Any] = {}
    for key, field in _GENERATION_KEYS.items():
        value = found.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SystemExit(f"headrace serve: generation config {key}: not a number: {value!r}")
        values[field] = int(value) if field in ("top_k", "max_tokens") else float(value)
    if values:
        logger.info("request defaults from the model's generation config: %s", values)
    return SamplingDefaults(**values)


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        return _read_json_text(path.read_text(), f"{flag} {path}")
    except OSError as exc:
        raise SystemExit(f"headrace serve: {flag} {path}: {exc}") from None


def _read_json_text(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"headrace serve: {where}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"headrace serve: {where}: expected a JSON object")
    return value
