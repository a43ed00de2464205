"""Chat templating and tokenization on one dedicated thread, never on the event loop.

`tokenizers` releases the GIL only in its batch entry points, so every encode goes through
`encode_batch([text])`: a 300,000-character prompt then costs the event loop nothing.

Giant prompts are refused before they are tokenized: no token is longer than `max_token_chars`
characters, so a text longer than `max_model_len * max_token_chars` cannot fit; and a long text
whose first `PROBE_TOKENS`-ish characters already make more tokens than fit is refused after
tokenizing only that prefix.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# Characters per token below which a prefix probe is not worth it (most text is ~4 chars/token).
_PROBE_CHARS_PER_TOKEN = 8
_PROBE_MARGIN_TOKENS = 16


class PromptTooLongError(ValueError):
    """The prompt cannot fit the context window; the message carries both numbers."""


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """What a tokenized prompt must fit: the context window and the room kept for output."""

    max_model_len: int
    max_tokens: int | None = None  # requested output tokens, if the client named a number
    truncate_prompt_tokens: int | None = None  # keep at most this many (last) tokens; -1 = fit

    @property
    def reserve(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 1

    def keep_tokens(self) -> int | None:
        t = self.truncate_prompt_tokens
        return max(1, self.max_model_len - self.reserve) if t == -1 else t


def too_long_message(num_prompt: int, limits: PromptLimits, at_least: bool = False) -> str:
    bound = "at least " if at_least else ""
    if limits.max_tokens is not None:
        return (
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
            f"requested {bound}{num_prompt + limits.max_tokens} tokens ({bound}{num_prompt} in "
            f"the prompt, {limits.max_tokens} for the completion). Please reduce the length of "
            "the prompt or of max_tokens."
        )
    return (
        f"This model's maximum context length is {limits.max_model_len} tokens, but the prompt "
        f"has {bound}{num_prompt} tokens (at least one token must be left for the output). "
        "Please reduce the length of the prompt."
    )


def cut_text(text: str, limits: PromptLimits, max_token_chars: int) -> str:
    """What of `text` tokenizing needs, by character count alone: with truncation only its
    tail (no token is longer than `max_token_chars`); without, all of it, unless it is too long
    to fit whatever it tokenizes to (PromptTooLongError). The body decoder applies this before
    sending a request back, so a giant prompt never comes back into the API server whole."""
    keep = limits.keep_tokens()
    if keep is not None:
        margin = (keep + _PROBE_MARGIN_TOKENS) * max_token_chars
        return text[-margin:] if len(text) > margin else text
    if len(text) > limits.max_model_len * max_token_chars:
        at_least = math.ceil(len(text) / max_token_chars)
        raise PromptTooLongError(too_long_message(at_least, limits, at_least=True))
    return text


class FrontendTokenizer:
    """The HF tokenizer behind one single-thread executor; every method is async."""

    def __init__(
        self, tokenizer: Any, executor: ThreadPoolExecutor, chat_template: str | None = None
    ) -> None:
        self.hf = tokenizer
        self.chat_template = chat_template  # None: the model's own
        self.backend = tokenizer.backend_tokenizer
        self.executor = executor
        vocab = self.backend.get_vocab()
        self.max_token_chars = max(1, max(len(t) for t in vocab))
        self.vocab_size = len(tokenizer)
        # every token's text for logprobs, decoded once here (on the tokenizer thread: tens of
        # milliseconds for a whole vocabulary), not per token on the event loop
        ids = [[t] for t in range(self.vocab_size)]
        self._token_texts = [str(t) for t in self.backend.decode_batch(ids, False)]

    @classmethod
    async def load(cls, model: str | None, chat_template: str | None = None) -> FrontendTokenizer:
        from headrace.model.loader import load_tokenizer, resolve_model_path

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        loop = asyncio.get_running_loop()
        hf = await loop.run_in_executor(executor, lambda: load_tokenizer(resolve_model_path(model)))
        return await loop.run_in_executor(executor, lambda: cls(hf, executor, chat_template))

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- prompts -------------------------------------------------------------------------------
    async def encode_prompt(
        self, text: str, limits: PromptLimits, add_special_tokens: bool = True
    ) -> list[int]:
        """Tokenize a prompt, truncating or refusing it so that it fits `limits`."""
        return list(await self._run(self._encode_checked, text, limits, add_special_tokens))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def _encode_checked(self, text: str, limits: PromptLimits, add_special: bool) -> list[int]:
        keep = limits.keep_tokens()
        text = cut_text(text, limits, self.max_token_chars)
        if keep is not None:
            ids = self._encode(text, add_special)[-keep:]
            self.check_fits(len(ids), limits)
            return ids
        # Both guards look only at the prompt against the whole window; the exact check (with
        # the room for output) comes after tokenizing, so its message has exact numbers.
        max_len = limits.max_model_len
        probe_len = (max_len + _PROBE_MARGIN_TOKENS) * _PROBE_CHARS_PER_TOKEN
        if len(text) > probe_len:
            head = self._encode(text[:probe_len], add_special)
            if len(head) > max_len + _PROBE_MARGIN_TOKENS:
                bound = len(head) - _PROBE_MARGIN_TOKENS
                raise PromptTooLongError(too_long_message(bound, limits, at_least=True))
        ids = self._encode(text, add_special)
        self.check_fits(len(ids), limits)
        return ids

    @staticmethod
    def check_fits(num_tokens: int, limits: PromptLimits) -> None:
        """Raise PromptTooLongError unless the prompt leaves room for the requested output."""
        if num_tokens + limits.reserve > limits.max_model_len:
            raise PromptTooLongError(too_long_message(num_tokens, limits))

    def check_ids(self, ids: Sequence[int], limits: PromptLimits) -> list[int]:
        """Truncate a prompt given as token ids and check it like a tokenized one (cheap: no
        executor needed)."""
        keep = limits.keep_tokens()
        out = list(ids[-keep:]) if keep is not None else list(ids)
        if any(not 0 <= t < self.vocab_size for t in out):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        self.check_fits(len(out), limits)
        return out

    # -- chat ----------------------------------------------------------------------------------
    async def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        def render() -> str:
            return str(
                self.hf.apply_chat_template(
                    messages,
                    tools=tools,
                    chat_template=self.chat_template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    **(template_kwargs or {}),
                )
            )

        return str(await self._run(render))

    # -- text back -----------------------------------------------------------------------------
    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(
            await self._run(lambda: self.hf.decode(ids, skip_special_tokens=skip_special_tokens))
        )

    async def bad_words(self, words: list[str]) -> list[list[int]]:
        """vLLM's `bad_words` as token sequences (off the event loop)."""
        return list(await self._run(bad_words_token_ids, lambda t: self._encode(t, False), words))

    def token_text(self, token_id: int) -> str:
        """One token's text for logprobs (on the output path)."""
        if 0 <= token_id < len(self._token_texts):
            return self._token_texts[token_id]
        return str(self.backend.decode([token_id], skip_special_tokens=False))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def bad_words_token_ids(encode: Callable[[str], list[int]], words: list[str]) -> list[list[int]]:
    """Each bad word's tokens as written and after a space (so that it is banned at the start
    of the text and within it), as vLLM bans them; words with no tokens are left out."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = encode(text) if text.strip() else []
            if ids and ids not in out:
                out.append(ids)
    return out
