"""Sampler semantics on hand-made logits, and seeded sampling through the real engine."""

from __future__ import annotations

import pytest
import torch

from headrace.engine.sampler import sample
from headrace.offline import LLM
from headrace.wire.messages import SamplingParams
from tests.engine.factories import make_request

EOS = [0]


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _draws(logits: list[float], n: int = 300, **params: object) -> set[int]:
    params.setdefault("temperature", 1.0)
    req = make_request([5, 6], **params)
    seen = set()
    for _ in range(n):
        tokens, _ = sample(_logits(logits), [req], EOS)
        seen.add(tokens[0])
    return seen


def test_greedy_picks_argmax() -> None:
    req = make_request([1, 2])
    assert sample(_logits([0.1, 3.0, 2.0]), [req], EOS)[0] == [1]


@pytest.mark.parametrize("argmax", [None, "kernel"])
def test_bf16_logits_sample_as_their_float32_values(argmax: str | None) -> None:
    """The engine hands over bf16 logits: plain greedy takes their argmax as they are, every
    other path upcasts first; either way the tokens and logprobs are those of the float32
    values (bf16 -> float32 is exact)."""
    fn = None
    if argmax == "kernel":
        from headrace.model.backend import backend_kernels
        from tests.backends import BEST_BUILD

        if BEST_BUILD is None:
            pytest.skip("no C compiler")
        fn = backend_kernels(BEST_BUILD).argmax
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 300, generator=gen) * 3).to(torch.bfloat16)
    logits[0, 10] = logits[0, 20] = 50.0  # a tie: the first index wins

    def plain() -> list:
        return [make_request([1, 2]) for _ in range(6)]

    def mixed() -> list:  # fresh requests per call: the seeded one's generator advances
        return [
            make_request([1, 2]),
            make_request([1, 2], logprobs=3),
            make_request([1, 2], repetition_penalty=1.5),
            make_request([1, 2], min_tokens=4, stop_token_ids=[7]),
            make_request([1, 2], temperature=0.8, seed=3),
            make_request([1, 2], presence_penalty=1.0),
        ]

    for batch in (plain, mixed):
        want_tokens, want_lps = sample(logits.float(), batch(), EOS)
        got_tokens, got_lps = sample(logits, batch(), EOS, fn)
        assert got_tokens == want_tokens
        assert list(got_lps.values()) == list(want_lps.values())  # ids differ per call
    assert sample(logits, plain(), EOS, fn)[0][0] == 10
    if argmax == "kernel":  # the kernel's logprobs too: the same tokens and ranks, values close
        op = backend_kernels(BEST_BUILD).logprobs
        got_tokens, got_lps = sample(logits, mixed(), EOS, fn, op)
        assert got_tokens == want_tokens
        for got, want in zip(got_lps.values(), want_lps.values(), strict=True):
            assert (got.token_id, got.rank, got.top_ids) == (want.token_id, want.rank, want.top_ids)
            assert got.logprob == pytest.approx(want.logprob, abs=2e-5)
            assert got.top_logprobs == pytest.approx(want.top_logprobs, abs=2e-5)


def test_top_k_top_p_min_p_restrict_support() -> None:
    logits = [2.0, 1.9, 1.8, -1.0, -1.0, -1.0]
    assert _draws(logits, top_k=2) <= {0, 1}
    assert _draws(logits) > {0, 1, 2}  # unrestricted: the low tokens appear too
    # p ~ 0.35, 0.32, 0.29, 0.02 x3: top_p 0.5 keeps the first two tokens only
    assert _draws(logits, top_p=0.5) == {0, 1}
    assert _draws(logits, min_p=0.5) <= {0, 1, 2}


def test_penalties() -> None:
    req = make_request([3], repetition_penalty=2.0)
    req.append_output(1)
    # token 1 (4.0 -> 2.0) and token 3 (seen in the prompt) are penalized; token 2 wins
    assert sample(_logits([0.0, 4.0, 3.0, 3.5]), [req], EOS)[0] == [2]
    req = make_request([3], frequency_penalty=1.0)
    for _ in range(3):
        req.append_output(1)
    assert sample(_logits([0.0, 4.0, 2.0, 0.0]), [req], EOS)[0] == [2]  # 4 - 3*1 = 1 < 2
    req = make_request([3], presence_penalty=2.0)
    req.append_output(1)
    assert sample(_logits([0.0, 4.0, 2.5, 0.0]), [req], EOS)[0] == [2]  # 4 - 2 = 2 < 2.5


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    req = make_request([3], min_tokens=2, stop_token_ids=[2])
    assert sample(_logits([9.0, 1.0, 8.0]), [req], EOS)[0] == [1]
    req.append_output(1)
    req.append_output(1)
    assert sample(_logits([9.0, 1.0, 8.0]), [req], EOS)[0] == [0]


def test_logit_bias_and_allowed_token_ids() -> None:
    logits = [1.0, 3.0, 2.0, 0.5]
    assert sample(_logits(logits), [make_request([1], logit_bias={3: 5.0})], EOS)[0] == [3]
    assert sample(_logits(logits), [make_request([1], logit_bias={1: -1.5})], EOS)[0] == [2]
    # clamped to +-100, as OpenAI specifies: -1e6 is -100, and 3 - 100 still beats -inf
    req = make_request([1], logit_bias={1: -1e6}, allowed_token_ids=[1])
    assert req.params.logit_bias == {1: -100.0}
    assert sample(_logits(logits), [req], EOS)[0] == [1]
    assert _draws(logits, allowed_token_ids=[0, 3]) == {0, 3}
    assert _draws(logits, logit_bias={0: -100.0, 1: -100.0, 2: -100.0}) == {3}
    # in a batch, only the biased row moves; logprobs stay those of the model's output
    plain, biased = make_request([1]), make_request([1], logit_bias={0: 10.0}, logprobs=1)
    tokens, lps = sample(_logits(logits, logits), [plain, biased], EOS)
    assert tokens == [1, 0]
    ref = torch.tensor(logits).log_softmax(-1)
    assert lps[biased.request_id].logprob == pytest.approx(float(ref[0]))
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=[])


def test_bad_words_ban_a_words_last_token_once_its_start_is_out() -> None:
    logits = [1.0, 3.0, 2.0, 0.5]
    one = make_request([1], bad_words=["x"], bad_words_token_ids=[[1]])
    assert sample(_logits(logits), [one], EOS)[0] == [2]
    two = make_request([1], bad_words=["xy"], bad_words_token_ids=[[3, 1]])
    assert sample(_logits(logits), [two], EOS)[0] == [1]  # nothing of the word yet
    two.append_output(3)
    assert sample(_logits(logits), [two], EOS)[0] == [2]  # its first token is out: 1 banned
    two.append_output(2)
    assert sample(_logits(logits), [two], EOS)[0] == [1]
    with pytest.raises(ValueError, match="not tokenized"):
        SamplingParams(bad_words=["x"]).check_token_ids(10)


def test_bad_words_tokenized_as_written_and_after_a_space() -> None:
    from headrace.frontend.tokenize import bad_words_token_ids

    llm = LLM(dtype="float32")
    tok = llm.get_tokenizer()
    got = bad_words_token_ids(llm._encode_plain, ["Paris", " Paris", "", "  "])
    assert got == [tok("Paris").input_ids, tok(" Paris").input_ids]
    conv = [{"role": "user", "content": "Which city is the capital of France?"}]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    assert "Paris" in llm.chat(conv, greedy)[0].outputs[0].text
    banned = SamplingParams(temperature=0.0, max_tokens=12, bad_words=["Paris"])
    assert "Paris" not in llm.chat(conv, banned)[0].outputs[0].text


def test_token_ids_outside_the_vocabulary_are_refused_not_indexed() -> None:
    """The sampler indexes logits with these ids: an engine refuses the request (one error
    output) rather than failing its step, which would end every request in it."""
    llm = LLM(dtype="float32")
    vocab = llm.engine.runner.arch.vocab_size
    for bad in (
        SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[vocab]),
        SamplingParams(max_tokens=4, logit_bias={vocab + 7: 1.0}),
        SamplingParams(max_tokens=4, allowed_token_ids=[5, -1]),
    ):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
            llm.generate([[5, 6, 7]], bad)
    assert not llm.engine.has_unfinished_requests()
    only = SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=[vocab - 1, 42])
    assert set(llm.generate([[5, 6, 7]], only)[0].outputs[0].token_ids) <= {vocab - 1, 42}


def test_logprobs_of_raw_distribution() -> None:
    req = make_request([1], logprobs=2)
    tokens, lps = sample(_logits([1.0, 3.0, 2.0]), [req], EOS)
    lp = lps[req.request_id]
    ref = torch.tensor([1.0, 3.0, 2.0]).log_softmax(-1)
    assert tokens == [1] and lp.token_id == 1 and lp.rank == 1
    assert lp.top_ids == [1, 2]
    assert lp.logprob == pytest.approx(float(ref[1]))
    assert lp.top_logprobs == pytest.approx([float(ref[1]), float(ref[2])])


def test_seeded_output_independent_of_batch() -> None:
    llm = LLM(dtype="float32")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    conv = [{"role": "user", "content": "Write a short poem about autumn leaves."}]
    alone = llm.chat(conv, seeded)[0].outputs[0].token_ids
    others = [
        [{"role": "user", "content": f"Tell me fact number {i} about space."}] for i in range(7)
    ]
    params = [
        SamplingParams(temperature=0.8, max_tokens=30, seed=i if i % 2 else None) for i in range(7)
    ]
    mixed = llm.chat([*others[:3], conv, *others[3:]], [*params[:3], seeded, *params[3:]])
    assert mixed[3].outputs[0].token_ids == alone
    chunked = LLM(dtype="float32", max_num_batched_tokens=16, max_num_seqs=3)
    again = chunked.chat([*others[:2], conv], [*params[:2], seeded])[2].outputs[0].token_ids
    assert again == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=24)
    assert len({tuple(llm.chat(conv, unseeded)[0].outputs[0].token_ids) for _ in range(3)}) > 1


def test_refused_prompt_leaves_engine_clean() -> None:
    """A prompt the engine refuses mid-batch must not strand the prompts added before it."""
    llm = LLM(dtype="float32", num_kv_blocks=8)  # max_model_len 128
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="maximum context length is 128"):
        llm.generate([[5, 6, 7], list(range(10, 200))], params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == 8
    out = llm.generate([[5, 6, 7]], params)
    assert len(out[0].outputs[0].token_ids) == 4


def test_prompt_logprobs_are_the_models_at_every_position() -> None:
    """vLLM's `prompt_logprobs`: each prompt token's logprob under the tokens before it (and
    the top alternatives), against transformers' forward pass over the same prompt; the same
    when the prompt is cut into chunks, when its prefix is cached, and beside other requests."""
    from tests.engine.test_greedy_vs_transformers import Reference

    llm = LLM(dtype="float32")
    prompt = llm.get_tokenizer()(
        "The capital of France is Paris. The capital of Italy is"
    ).input_ids
    with torch.inference_mode():
        ref = Reference().model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)

    def check(got: list) -> None:
        assert got[0] is None and len(got) == len(prompt)
        for p, lp in enumerate(got[1:]):
            assert lp.token_id == prompt[p + 1]
            assert lp.logprob == pytest.approx(float(ref[p, prompt[p + 1]]), abs=2e-3)
            assert lp.rank == int((ref[p] > ref[p, prompt[p + 1]]).sum()) + 1
            top = ref[p].topk(3)
            assert lp.top_ids == top.indices.tolist()
            assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=2e-3)

    check(llm.generate(prompt, params)[0].prompt_logprobs)
    again = llm.generate(prompt, params)[0]  # its blocks are cached now: not used for this one
    check(again.prompt_logprobs)
    assert again.num_cached_tokens == 0
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    mixed = llm.generate([[5, 6, 7], prompt, prompt[:5]], [plain, params, plain])
    check(mixed[1].prompt_logprobs)
    assert mixed[0].prompt_logprobs is None
    chunked = LLM(dtype="float32", max_num_batched_tokens=8, max_num_seqs=2)
    check(chunked.generate(prompt, params)[0].prompt_logprobs)
