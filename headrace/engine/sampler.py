"""Turn a batch of logits into one token per request, honouring each request's SamplingParams.

Order per row: allowed_token_ids, bad_words and logit_bias -> penalties (repetition, presence,
frequency) -> min_tokens masking -> greedy argmax, or temperature -> top-k -> top-p -> min-p ->
draw (as vLLM's sampler orders them). Logprobs are those of the raw model output.
A seeded request draws from its own torch.Generator, so its text does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from headrace.engine.request import Request
from headrace.model.ops import TORCH_OPS
from headrace.wire.messages import TokenLogprobs

_NEG_INF = float("-inf")
# (logits, one token per row, k) -> (its logprob, its rank, top k logprobs, their ids)
LogprobsOp = Callable[
    [torch.Tensor, torch.Tensor, int],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
]


def _penalized(r: Request) -> bool:
    p = r.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _biased(r: Request) -> bool:
    p = r.params
    return bool(p.logit_bias) or p.allowed_token_ids is not None or bool(p.bad_words_token_ids)


def _banned_words(r: Request) -> list[int]:
    """The last token of each bad word whose earlier tokens end the output so far."""
    out = r.output_token_ids
    banned = []
    for seq in r.params.bad_words_token_ids or ():
        head = len(seq) - 1  # the last output token is compared first: most words end there
        if head == 0 or (
            len(out) >= head and out[-1] == seq[head - 1] and out[len(out) - head :] == seq[:head]
        ):
            banned.append(seq[-1])
    return banned


def _apply_bias(logits: torch.Tensor, reqs: Sequence[Request]) -> None:
    """allowed_token_ids: every other token to -inf; bad words' next tokens to -inf;
    logit_bias: added to its tokens."""
    for i, r in enumerate(reqs):
        p, row = r.params, logits[i]
        if p.allowed_token_ids is not None:
            allowed = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=row.device)
            kept = row[allowed]
            row.fill_(_NEG_INF)
            row[allowed] = kept
        if p.bad_words_token_ids and (banned := _banned_words(r)):
            row[banned] = _NEG_INF
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
            row.index_add_(0, ids, bias)


def _apply_penalties(logits: torch.Tensor, reqs: Sequence[Request]) -> None:
    rows = [i for i, r in enumerate(reqs) if _penalized(r)]
    if not rows:
        return
    vocab = logits.shape[1]
    for i in rows:
        p = reqs[i].params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(reqs[i].all_token_ids, dtype=torch.long, device=row.device)
            seen = seen[seen < vocab]
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if reqs[i].output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(reqs[i].output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.zeros(vocab, dtype=row.dtype, device=row.device)
            counts.scatter_add_(
                0, out[out < vocab], torch.ones_like(out, dtype=row.dtype)[out < vocab]
            )
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _mask_min_tokens(logits: torch.Tensor, reqs: Sequence[Request], eos: Sequence[int]) -> None:
    for i, r in enumerate(reqs):
        if len(r.output_token_ids) < r.params.min_tokens:
            banned = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(eos))
            if banned:
                logits[i, banned] = _NEG_INF


def _filter(logits: torch.Tensor, reqs: Sequence[Request]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p as -inf masks; returns probabilities."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in reqs], device=dev).unsqueeze(1)
    logits = logits / temps
    top_k = [r.params.top_k for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        k_t = torch.tensor([k if k > 0 else vocab for k in top_k], device=dev).unsqueeze(1)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k_t, _NEG_INF)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        p_t = torch.tensor(top_p, device=dev).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill((before >= p_t) & (ranks > 0), _NEG_INF)
        logits = torch.full_like(logits, _NEG_INF).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    min_p = [r.params.min_p for r in reqs]
    if any(m > 0 for m in min_p):
        m_t = torch.tensor(min_p, device=dev).unsqueeze(1)
        probs = probs.masked_fill(probs < m_t * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _draw(probs: torch.Tensor, reqs: Sequence[Request]) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / E) with E ~ Exp(1) is a draw from p."""
    noise = torch.empty_like(probs)
    seeded = [i for i, r in enumerate(reqs) if r.generator is not None]
    if len(seeded) < len(reqs):
        noise.exponential_()
    for i in seeded:
        gen = reqs[i].generator
        assert gen is not None
        row = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=gen)
        noise[i] = row.to(probs.device)
    return (probs / noise).argmax(dim=-1)


def token_logprobs(
    op: LogprobsOp, logits: torch.Tensor, tokens: list[int], ks: list[int]
) -> list[TokenLogprobs]:
    """Row i's logprob of tokens[i], its rank and its ks[i] top alternatives, one `op` call
    for all the rows (prompt logprobs use it too)."""
    got = op(logits, torch.tensor(tokens, device=logits.device), max(ks, default=0))
    chosen_lp, ranks, top_lp, top_ids = (t.tolist() for t in got)
    return [
        TokenLogprobs(
            token_id=token,
            logprob=chosen_lp[j],
            rank=ranks[j],
            top_ids=top_ids[j][: ks[j]],
            top_logprobs=top_lp[j][: ks[j]],
        )
        for j, token in enumerate(tokens)
    ]


def _logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, reqs: Sequence[Request], op: LogprobsOp
) -> dict[str, TokenLogprobs]:
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if not rows:
        return {}
    ks = [reqs[i].params.logprobs or 0 for i in rows]
    found = token_logprobs(op, raw[rows], tokens[rows].tolist(), ks)
    return {reqs[i].request_id: lp for i, lp in zip(rows, found, strict=True)}


def plain_greedy(reqs: Sequence[Request]) -> bool:
    """Whether every request's token is just the argmax of its logits: greedy, with no penalty,
    bias, min_tokens still to hold off EOS, or logprobs."""
    return all(
        r.params.greedy
        and not _penalized(r)
        and not _biased(r)
        and len(r.output_token_ids) >= r.params.min_tokens
        and r.params.logprobs is None
        for r in reqs
    )


def sample(
    logits: torch.Tensor,
    reqs: Sequence[Request],
    eos_token_ids: Sequence[int],
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    logprobs: LogprobsOp | None = None,
) -> tuple[list[int], dict[str, TokenLogprobs]]:
    """logits: [N, vocab] float32 or bfloat16, row i for reqs[i]. Returns (token per row,
    logprobs by id). `argmax` replaces `Tensor.argmax(-1)` (the CPU kernel's, which reads bf16
    logits without an upcast copy), `logprobs` torch's log_softmax, rank and topk (the CPU
    kernel's, one call). A batch that is all plain greedy (no penalty, min_tokens or logprobs)
    takes the argmax of the logits as they are: bf16 -> float32 is exact, so the tokens are
    the same."""
    argmax = argmax or (lambda x: x.argmax(dim=-1))
    logprobs = logprobs or TORCH_OPS.logprobs
    if plain_greedy(reqs):
        return argmax(logits).tolist(), {}
    random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    modified = any(
        _penalized(r) or _biased(r) or len(r.output_token_ids) < r.params.min_tokens for r in reqs
    )
    want_logprobs = any(r.params.logprobs is not None for r in reqs)
    raw = logits.float()  # the model's output, for logprobs (a copy when it was bf16)
    logits = raw.clone() if modified and (want_logprobs or raw is logits) else raw
    _apply_bias(logits, reqs)
    _apply_penalties(logits, reqs)
    _mask_min_tokens(logits, reqs, eos_token_ids)
    tokens = argmax(logits)
    if random_rows:
        sub = [reqs[i] for i in random_rows]
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _draw(_filter(logits[idx], sub), sub)
    return tokens.tolist(), _logprobs(raw, tokens, reqs, logprobs)
