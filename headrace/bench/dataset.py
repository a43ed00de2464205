"""The `random` dataset: prompts of an exact token length, built from random pseudo-words.

Lengths are made exact with the target server's own tokenizer (`/tokenize`, `/detokenize`) or a
local one (`--tokenizer PATH`, an HF directory or a .gguf file): generate more words than needed,
cut the token ids to the target, decode, and re-check (a cut can merge at the boundary).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import httpx

_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
_MAX_FIX_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    input_len: int
    output_len: int


class RemoteTokenizer:
    """Encode/decode through the server's /tokenize and /detokenize, or a local tokenizer."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, model: str, local_path: str | None
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.model = model
        self.local: Any = None
        if local_path is not None:
            from headrace.model.loader import load_tokenizer, resolve_model_path

            self.local = load_tokenizer(resolve_model_path(local_path))

    async def encode(self, text: str) -> list[int]:
        if self.local is not None:
            return list(self.local(text, add_special_tokens=False).input_ids)
        resp = await self.client.post(
            self.base_url + "/tokenize",
            json={"model": self.model, "prompt": text, "add_special_tokens": False},
        )
        resp.raise_for_status()
        return [int(t) for t in resp.json()["tokens"]]

    async def decode(self, ids: list[int]) -> str:
        if self.local is not None:
            return str(self.local.decode(ids))
        resp = await self.client.post(
            self.base_url + "/detokenize", json={"model": self.model, "tokens": ids}
        )
        resp.raise_for_status()
        return str(resp.json()["prompt"])


def _words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(count)]


async def exact_length_text(tok: RemoteTokenizer, rng: random.Random, target: int) -> Prompt:
    """Text that tokenizes to `target` tokens (or the closest found in a few rounds)."""
    text = " ".join(_words(rng, target))
    ids = await tok.encode(text)
    for _ in range(_MAX_FIX_ROUNDS):
        if len(ids) > target:
            text = await tok.decode(ids[:target])
        elif len(ids) < target:
            text = text + " " + " ".join(_words(rng, target - len(ids)))
        else:
            break
        ids = await tok.encode(text)
    return Prompt(text, len(ids), 0)


async def random_prompts(
    tok: RemoteTokenizer,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[Prompt]:
    """`num` prompts; lengths uniform in [len * (1 - ratio), len * (1 + ratio)] as vLLM's."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n_in = max(
            1, rng.randint(int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio)))
        )
        n_out = max(
            1, rng.randint(int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio)))
        )
        p = await exact_length_text(tok, rng, n_in)
        out.append(Prompt(p.text, p.input_len, n_out))
    return out
