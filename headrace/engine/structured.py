"""Constrained decoding with xgrammar: a grammar per request, an allowed-token bitmask per step.

    add_request --> Grammars.attach: compile on the grammar thread (cached by constraint)
    schedule    --> a request whose grammar is still compiling waits (the rest of the batch runs)
    execute     --> Grammars.mask: each constrained row's bitmask, applied to its logits in place
    update      --> GrammarState.ends_with(token): a grammar that is complete ends the request

Compiling runs on one background thread (xgrammar's compiler releases the GIL), so a slow schema
delays only its own request. The tokenizer info is built on that thread at the first
constrained request: a server that never sees one never pays for it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.wire.messages import StructuredOutputsParams

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[01:54:55] /project/x.cc:94: "
_CACHE_SIZE = 512  # compiled grammars kept (a JSON schema's is tens of KiB to a few MiB)


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # installed without dependencies by `make`; see the README
        raise RuntimeError(
            "structured outputs need xgrammar: pip install --no-deps xgrammar apache-tvm-ffi"
        ) from exc
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def to_grammar(xgr: Any, spec: StructuredOutputsParams) -> Any:
    """The xgrammar Grammar for a constraint; raises (ValueError or xgrammar's errors, whose
    message says what is wrong) for a bad schema, regex, grammar or structural tag. Needs no
    tokenizer, so the API server runs it to refuse bad requests with a 400."""
    whitespace = not spec.disable_any_whitespace
    if spec.json_object:  # an object, as OpenAI's json_object promises (not any JSON value)
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=whitespace)
    if spec.json is not None:
        schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=whitespace, strict_mode=True)
    if spec.regex is not None:
        return xgr.Grammar.from_regex(spec.regex)
    if spec.choice is not None:
        return xgr.Grammar.from_ebnf(choice_grammar(spec.choice))
    if spec.grammar is not None:
        return xgr.Grammar.from_ebnf(spec.grammar)
    assert spec.structural_tag is not None
    return structural_tag_grammar(xgr, spec.structural_tag)


def structural_tag_grammar(xgr: Any, text: str) -> Any:
    """vLLM's two forms: `{"type": "structural_tag", "structures": [{begin, schema, end}],
    "triggers": [...]}`, or xgrammar's own structural tag format (anything else)."""
    tag = json.loads(text)
    if isinstance(tag, dict) and "structures" in tag:
        items = [
            xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
            for s in tag["structures"]
        ]
        return xgr.Grammar.from_structural_tag(items, tag.get("triggers", []))
    return xgr.Grammar.from_structural_tag(text)


def check_constraint(spec: StructuredOutputsParams) -> None:
    """Raise ValueError naming what is wrong with a constraint (the API server's 400)."""
    xgr = import_xgrammar()
    try:
        to_grammar(xgr, spec)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        message = _XGRAMMAR_PREFIX.sub("", str(exc)).strip()
        raise ValueError(f"invalid {spec.kind} constraint: {message}") from None


def _cache_key(spec: StructuredOutputsParams) -> str:
    return json.dumps([spec.kind, spec.json, spec.regex, spec.choice, spec.grammar,
                       spec.structural_tag, spec.disable_any_whitespace])  # fmt: skip


class GrammarState:
    """One request's grammar: compiling until `ready`, then a matcher that follows its output."""

    def __init__(self, future: Future[Any]) -> None:
        self.future = future
        self.matcher: Any = None
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        """Compiled (or failed: `error` says why). Checked by the scheduler before admitting."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self.future.done():
            return False
        try:
            compiled = self.future.result()
            self.matcher = import_xgrammar().GrammarMatcher(compiled)  # imported: it compiled
        except Exception as exc:  # a constraint the API server's check let through
            self.error = f"the structured output constraint did not compile: {exc}"
        return True

    def ends_with(self, token: int) -> bool:
        """Advance past a sampled token (a preempted request replays none: its matcher keeps
        its place); True when the request ends here: the grammar is complete (its stop token
        was accepted), or the token was one the mask forbids, which is logged."""
        if not self.matcher.accept_token(token):
            logger.error("a constrained request sampled token %d, which its grammar forbids", token)
            return True
        return bool(self.matcher.is_terminated())


class Grammars:
    """The engine's grammar compiler, cache and bitmask buffer."""

    def __init__(self, model_path: Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.xgr: Any = None
        self._compiler: Any = None
        self._cache: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._bitmask: torch.Tensor | None = None

    def attach(self, spec: StructuredOutputsParams) -> GrammarState:
        """Start compiling (or reuse the compiled grammar of the same constraint)."""
        key = _cache_key(spec)
        with self._lock:
            future = self._cache.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._executor.submit(self._compile, spec)
                self._cache[key] = future
                if len(self._cache) > _CACHE_SIZE:  # the oldest constraint goes
                    del self._cache[next(iter(self._cache))]
        return GrammarState(future)

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        if self._compiler is None:  # importing xgrammar takes ~2 s: here, not on the step loop
            self.xgr = import_xgrammar()
            from headrace.model.loader import load_tokenizer

            info = self.xgr.TokenizerInfo.from_huggingface(
                load_tokenizer(self.model_path),
                vocab_size=self.vocab_size,
                stop_token_ids=self.eos_token_ids,
            )
            self._compiler = self.xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler.compile_grammar(to_grammar(self.xgr, spec))

    def mask(self, logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
        """Forbid, in place, every token the grammar of `states[i]` disallows in row `rows[i]`."""
        n = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = self.xgr.allocate_token_bitmask(max(n, 16), self.vocab_size)
        bitmask = self._bitmask
        for row, state in zip(rows, states, strict=True):
            state.matcher.fill_next_token_bitmask(bitmask, row)
        if logits.device.type == "cpu":
            self.xgr.apply_token_bitmask_inplace(logits, bitmask[:n], indices=rows)
        else:  # xgrammar's GPU kernels need triton, which headrace does not install
            apply_bitmask(logits, bitmask[:n].to(logits.device, non_blocking=True), rows)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place, on any device with torch ops: logits[r, t] = -inf where bit t % 32 of word
    t // 32 of bitmask[r] is 0 (xgrammar's int32 layout), for each r in rows."""
    import torch  # (this module is imported by the API server, which needs no torch)

    index = torch.tensor(rows, device=logits.device)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    bits = (bitmask[index].unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    assert bits.shape[1] * 32 >= logits.shape[1], "the bitmask covers every logit"
    allowed = bits.flatten(1)[:, : logits.shape[1]].bool()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
