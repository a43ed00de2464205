"""Owns the model and the KV cache tensors; turns a SchedulePlan into sampled tokens.

Token layout of one step: requests computing a single token (decodes) first, then prompt chunks.
Each of the two runs as one attention group (see model/attention.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from headrace.config import CacheConfig, ModelConfig
from headrace.engine.request import Request
from headrace.engine.sampler import plain_greedy, sample, token_logprobs
from headrace.engine.scheduler import RunnerOutput, SchedulePlan
from headrace.engine.structured import Grammars
from headrace.model.attention import FP8_DTYPES, AttentionMetadata, AttnGroup, build_group
from headrace.model.backend import select_backend
from headrace.model.loader import ProgressFn, load_model, read_arch, resolve_model_path
from headrace.model.ops import ops_for
from headrace.model.registry import ArchConfig
from headrace.wire.messages import TokenLogprobs

logger = logging.getLogger(__name__)

_SCORED_ROWS = 256  # prompt-logprob rows per LM-head call: 256 x vocab float32 logits at most


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    """What the runner found at start-up (travels back to the frontend in the READY message)."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    dtype: str
    kv_cache_dtype: str
    eos_token_ids: tuple[int, ...]


class ModelRunner:
    """Loads the model, allocates the paged KV cache, runs one forward + sample per step."""

    def __init__(
        self, model_cfg: ModelConfig, cache_cfg: CacheConfig, progress: ProgressFn | None = None
    ) -> None:
        self.device = torch.device(model_cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but no CUDA device is available")
        path = resolve_model_path(model_cfg.model)
        arch, source = read_arch(path)
        max_len = _max_model_len(model_cfg.max_model_len, arch)
        self.backend = select_backend(self.device)
        logger.info("compute backend %s: %s", self.backend.name, self.backend.why)
        self.dtype = self.backend.dtype(model_cfg.dtype)
        torch.manual_seed(model_cfg.seed)
        loaded = load_model(
            path, arch, source, self.dtype, self.backend, max_len, progress,
            engines_per_machine=model_cfg.engines_per_machine,
        )  # fmt: skip
        self.model, self.arch = loaded.model, loaded.arch
        self.block_size = cache_cfg.block_size
        self.ops = ops_for(self.backend.kernels)
        # prompt chunks: the C kernel reads lengths; the torch path needs them padded and masked
        self.padded_attention = self.ops.prefill_padded(self.arch.head_dim)
        self.kv_dtype = self.backend.kv_cache_dtype(self.dtype, cache_cfg.kv_cache_dtype)
        per_block = (
            2
            * arch.num_layers
            * self.block_size
            * arch.num_kv_heads
            * arch.head_dim
            * self.kv_dtype.itemsize
        )
        num_blocks = cache_cfg.num_kv_blocks or max(1, cache_cfg.kv_cache_memory // per_block)
        if num_blocks * self.block_size < max_len:
            logger.warning(
                "KV cache holds %d tokens; lowering max_model_len from %d to that",
                num_blocks * self.block_size,
                max_len,
            )
            max_len = num_blocks * self.block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_len
        self.grammars = Grammars(path, arch.vocab_size, arch.eos_token_ids)
        shape = (2, num_blocks, self.block_size, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            for _ in range(arch.num_layers)
        ]
        self._measuring_kv_scales = cache_cfg.calculate_kv_scales and self.kv_dtype in FP8_DTYPES
        if self._measuring_kv_scales:
            for attn in self.model.attention:
                attn.measure_kv_scales = True
        elif cache_cfg.calculate_kv_scales:
            logger.warning("--calculate-kv-scales: only an fp8 KV cache has scales; ignored")
        logger.info(
            "model %s loaded: %s, dtype %s, KV cache %s: %d blocks of %d tokens (%.0f MiB), "
            "max_model_len %d",
            path.name, arch.architecture, self.dtype, self.kv_dtype, num_blocks, self.block_size,
            num_blocks * per_block / 2**20, max_len,
        )  # fmt: skip

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(
            num_kv_blocks=self.num_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            dtype=str(self.dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
            eos_token_ids=self.arch.eos_token_ids,
        )

    @torch.inference_mode()
    def execute(self, plan: SchedulePlan) -> RunnerOutput:
        pairs = list(zip(plan.requests, plan.num_new_tokens, strict=True))
        pairs.sort(key=lambda p: p[1] > 1)  # decodes first, stable
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        scored: list[tuple[Request, int, int]] = []  # (request, first row, rows): prompt logprobs
        for req, n in pairs:
            start = req.num_computed_tokens
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens:
                scored.append((req, len(ids), n))
            ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if start + n == req.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(req)
        meta = self._attention_metadata(pairs)
        dev = self.device
        hidden = self.model(
            torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.kv_caches, meta
        )
        if self._measuring_kv_scales:  # the first pass set them
            self._measuring_kv_scales = False
            k, v = zip(*(attn.kv_scales for attn in self.model.attention), strict=True)
            logger.info(
                "fp8 KV cache scales from the first batch (%d tokens): k %.3g-%.3g, v %.3g-%.3g",
                len(ids), min(k), max(k), min(v), max(v),
            )  # fmt: skip
        prompt_logprobs = self._prompt_logprobs(hidden, scored) if scored else {}
        if not sample_reqs:
            return RunnerOutput(sampled={}, prompt_logprobs=prompt_logprobs)
        # rows in order, so as many rows as tokens means every row (a step of decodes)
        if len(sample_rows) == hidden.shape[0]:
            last = hidden
        else:
            last = hidden[torch.tensor(sample_rows, device=dev)]
        argmax = self.ops.argmax
        constrained = [i for i, r in enumerate(sample_reqs) if r.grammar is not None]
        if plain_greedy(sample_reqs) and not constrained:
            # the LM head's own argmax where it has one (no logits written), else the logits'
            greedy = self.model.greedy_tokens(last)
            if greedy is None:
                logits = self.model.compute_logits(last)
                greedy = argmax(logits)
            tokens = greedy.tolist()
            return RunnerOutput(
                sampled={r.request_id: t for r, t in zip(sample_reqs, tokens, strict=True)},
                prompt_logprobs=prompt_logprobs,
            )
        logits = self.model.compute_logits(last)
        if constrained:
            states = [sample_reqs[i].grammar for i in constrained]
            self.grammars.mask(logits, constrained, states)  # type: ignore[arg-type]
        tokens, logprobs = sample(
            logits, sample_reqs, self.arch.eos_token_ids, argmax, self.ops.logprobs
        )
        return RunnerOutput(
            sampled={r.request_id: t for r, t in zip(sample_reqs, tokens, strict=True)},
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(
        self, hidden: torch.Tensor, scored: list[tuple[Request, int, int]]
    ) -> dict[str, list[TokenLogprobs]]:
        """Each scored request's logprob of its prompt tokens that this step's rows predict
        (the row at position p predicts token p + 1), past those it already has (a preempted
        request computes its prompt again), with its `prompt_logprobs` top alternatives."""
        rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        owners: list[tuple[Request, int]] = []  # (request, how many rows)
        for req, row0, n in scored:
            start = req.num_computed_tokens
            first = max(start, len(req.prompt_logprobs))  # positions already scored: skipped
            positions = range(first, min(start + n, req.num_prompt_tokens - 1))
            rows.extend(row0 + p - start for p in positions)
            targets.extend(req.prompt_token_ids[p + 1] for p in positions)
            ks.extend([req.params.prompt_logprobs or 0] * len(positions))
            owners.append((req, len(positions)))
        found: list[TokenLogprobs] = []
        for at in range(0, len(rows), _SCORED_ROWS):  # bounded logits: rows x vocab float32
            part = torch.tensor(rows[at : at + _SCORED_ROWS], device=hidden.device)
            logits = self.model.compute_logits(hidden[part])
            end = at + _SCORED_ROWS
            found += token_logprobs(self.ops.logprobs, logits, targets[at:end], ks[at:end])
        out: dict[str, list[TokenLogprobs]] = {}
        at = 0
        for req, count in owners:
            out[req.request_id] = found[at : at + count]
            at += count
        return out

    def _attention_metadata(self, pairs: list[tuple[Request, int]]) -> AttentionMetadata:
        groups: list[AttnGroup] = []
        slots: list[torch.Tensor] = []
        num_decodes = sum(1 for _, n in pairs if n == 1)
        start = 0
        g = self.arch.num_heads // self.arch.num_kv_heads
        for chunk in (pairs[:num_decodes], pairs[num_decodes:]):
            if not chunk:
                continue
            q_lens = [n for _, n in chunk]
            ctx_lens = [r.num_computed_tokens + n for r, n in chunk]
            group, new_slots = build_group(
                start, q_lens, ctx_lens, [r.block_ids for r, _ in chunk], self.block_size, g,
                padded=self.padded_attention,
            )  # fmt: skip
            groups.append(group.to(self.device))
            slots.append(new_slots)
            start += sum(q_lens)
        slot_mapping = (slots[0] if len(slots) == 1 else torch.cat(slots)).to(self.device)
        return AttentionMetadata(slot_mapping, groups, self.ops)


def _max_model_len(requested: int | None, arch: ArchConfig) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None and arch.sliding_window < limit:
        limit = arch.sliding_window  # within the window, full attention is exact
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} tokens")
    return requested
