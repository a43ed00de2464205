"""Incremental detokenization with stop strings.

Decoding each new token alone breaks multi-byte characters and word-initial spaces, so text is
decoded over a short window: `ids[prefix:read]` was already emitted; `ids[prefix:]` is decoded
again and only what it adds is new. A window ending in U+FFFD (half a UTF-8 character) waits for
the next token. The window starts with the prompt's last tokens so the first word spaces right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of one output sequence, grown token by token; finds stop strings as it goes."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        self.stopped_by: str | None = None
        # A stop string may straddle chunks: never stream the last len(longest stop)-1 chars early.
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add_tokens(self, token_ids: Sequence[int]) -> bool:
        """Append tokens; return True if a stop string ended the text."""
        for token in token_ids:
            if self.stopped_by is not None:
                break
            self._ids.append(token)
            before = self._decode(self._ids[self._prefix : self._read])
            after = self._decode(self._ids[self._prefix :])
            if len(after) <= len(before) or after.endswith("\ufffd"):
                continue
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._append(delta)
        return self.stopped_by is not None

    def flush(self) -> None:
        """At the end of the sequence, emit whatever is still pending (even a broken character)."""
        if self.stopped_by is None and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            after = self._decode(self._ids[self._prefix :])
            self._read = len(self._ids)
            if len(after) > len(before):
                self._append(after[len(before) :])

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self._holdback)
        self.text += delta
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1:
                self.stopped_by = s
                self.text = self.text[: idx + len(s) if self.include_stop else idx]
                return

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; holds back a possible stop-string prefix unless finished."""
        end = (
            len(self.text)
            if finished or self.stopped_by
            else max(self._sent, len(self.text) - self._holdback)
        )
        out = self.text[self._sent : end]
        self._sent = end
        return out
