"""The official `openai` client against a real `headrace serve`: every shape a client relies on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from headrace.offline import LLM
from headrace.wire.messages import SamplingParams
from tests.backends import RUNNABLE
from tests.conftest import SERVER_ARGS
from tests.e2e.server import ServerProcess, wait_idle

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def offline() -> Iterator[LLM]:
    yield LLM(dtype="float32", max_model_len=2048, num_kv_blocks=256)


def test_greedy_chat_and_completion_equal_offline(server: ServerProcess, offline: LLM) -> None:
    client = server.client()
    params = SamplingParams(temperature=0.0, max_tokens=24)
    want_chat = offline.chat(CHAT, params)[0].outputs[0]
    want_text = offline.generate(PROMPT, params)[0].outputs[0]

    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=CHAT,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.choices[0].message.content == want_chat.text
    assert chat.choices[0].finish_reason == want_chat.finish_reason
    assert chat.usage is not None and chat.usage.completion_tokens == len(want_chat.token_ids)

    comp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0
    )
    assert comp.choices[0].text == want_text.text
    assert comp.usage is not None
    assert comp.usage.prompt_tokens == len(offline.get_tokenizer()(PROMPT).input_ids)

    # Streaming gives the same text, a role-only first chunk, and exact usage at the end.
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want_chat.text
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens == len(want_chat.token_ids)
    assert usage.prompt_tokens == chat.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks_c = list(stream)
    assert "".join(c.choices[0].text for c in chunks_c if c.choices) == want_text.text
    assert chunks_c[-1].usage is not None
    assert chunks_c[-1].usage.completion_tokens == len(want_text.token_ids)

    # vLLM's continuous_usage_stats: every chunk carries the usage so far
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = {"model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0,
              "stream": True, "stream_options": options}  # fmt: skip
    for route, total in (("completions", want_text), ("chat", want_chat)):
        if route == "chat":
            live = list(client.chat.completions.create(messages=CHAT, **common))  # type: ignore[call-overload]
        else:
            live = list(client.completions.create(prompt=PROMPT, **common))  # type: ignore[call-overload]
        assert all(c.usage is not None for c in live)
        so_far = [c.usage.completion_tokens for c in live]  # type: ignore[union-attr]
        assert so_far == sorted(so_far) and so_far[-1] == so_far[-2] == len(total.token_ids)
        assert live[-1].usage == live[-2].usage and not live[-1].choices


@pytest.mark.parametrize("backend", RUNNABLE[1:])  # the shared server runs the first (auto)
def test_served_greedy_text_is_the_same_on_every_backend(offline: LLM, backend: str) -> None:
    """HEADRACE_CPU_BACKEND reaches the engine processes, which log their choice (and the caps it
    sets on torch's libraries), and the served greedy text is the default backend's."""
    want = offline.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    srv = ServerProcess(*SERVER_ARGS, env={"HEADRACE_CPU_BACKEND": backend}).wait_ready()
    try:
        chat = srv.client().chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=24, temperature=0
        )  # fmt: skip
        assert chat.choices[0].message.content == want.text
        log = srv.log.read_text()
        assert f"compute backend {backend}:" in log
        cap = {"avx512": "AVX512_CORE_BF16", "avx2": "AVX2"}.get(backend)
        if cap:  # what a CPU without AMX (or AVX-512) runs, torch's matmuls included
            assert f"ONEDNN_MAX_CPU_ISA={cap}" in log
    finally:
        assert srv.stop() == 0


def test_n2_seeded_and_stop_strings(server: ServerProcess, offline: LLM) -> None:
    client = server.client()
    seeded = {"prompt": PROMPT, "max_tokens": 12, "n": 2, "seed": 7, "temperature": 1.0}
    out = client.completions.create(
        model="SmolLM2-135M-Instruct", **seeded, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage is not None
    assert out.usage.completion_tokens == 24  # two choices of 12
    again = client.completions.create(
        model="SmolLM2-135M-Instruct", **seeded, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]

    # Streaming n=2: both indexes appear, each ends once.
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=8,
            n=2,
            stream=True,
        )
    )
    ends = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(ends) == [0, 1]

    # A stop string: the text ends before it, finish_reason stop, stop_reason names it.
    full = offline.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24))[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = text[: text.index(stop)]
    res = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop]
    )
    assert res.choices[0].text == cut
    assert res.choices[0].finish_reason == "stop"
    raw = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": stop, "stream": True},
    )
    events = [line[6:] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(
        httpx.Response(200, content=e).json()["choices"][0]["text"] for e in events[:-1]
    )
    assert streamed == cut
    wait_idle(server.url)  # the stop string aborted the request in the engine: no block held

    echoed = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith(PROMPT)
    assert len(echoed.choices[0].text) > len(PROMPT)


def test_logprobs(server: ServerProcess) -> None:
    client = server.client()
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy = top-1
        assert t.logprob <= 0

    comp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    )
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 5
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.top_logprobs is not None and all(len(d) == 2 for d in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_logit_bias_and_allowed_token_ids(server: ServerProcess) -> None:
    """OpenAI's `logit_bias` (token ids as strings) and vLLM's `allowed_token_ids`, through the
    official client: the biased or allowed tokens are the ones generated."""
    client = server.client()
    yes, no = (httpx.post(server.url + "/tokenize", json={"prompt": w}).json()["tokens"][0]
               for w in (" yes", " no"))  # fmt: skip
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=3, temperature=0,  # type: ignore[arg-type]
        logit_bias={str(yes): 100},
    )  # fmt: skip
    assert chat.choices[0].message.content == " yes" * 3
    comp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3,
        logprobs=1, extra_body={"allowed_token_ids": [yes, no]},
    )  # fmt: skip
    assert set(comp.choices[0].text.split()) <= {"yes", "no"} and comp.usage is not None
    assert comp.usage.completion_tokens == 4
    # logprobs are the model's, not the restricted distribution's (vLLM's raw logprobs)
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert all(v is not None and v < -0.01 for v in lp.token_logprobs)


def test_prompt_logprobs_echo_and_vllms_field(server: ServerProcess, offline: LLM) -> None:
    """What scoring clients send (lm-eval's loglikelihood): `echo` with `logprobs` and
    `max_tokens` 0 gives the prompt's own logprobs, the first token's null; with `max_tokens`
    above 0 the generated ones follow. vLLM's `prompt_logprobs` field, on both routes."""
    client = server.client()
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    want = offline.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert want.prompt_logprobs is not None
    expected = [None] + [lp.logprob for lp in want.prompt_logprobs[1:]]  # type: ignore[union-attr]

    scored = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0
    )
    choice = scored.choices[0]
    assert choice.text == PROMPT and scored.usage is not None
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs is not None
    assert lp.top_logprobs[0] is None and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=2e-3)

    generating = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3,
        temperature=0,
    )  # fmt: skip
    g = generating.choices[0]
    assert g.logprobs is not None and g.logprobs.tokens is not None
    assert len(g.logprobs.tokens) == len(ids) + 3 and g.text == "".join(g.logprobs.tokens)
    assert g.logprobs.text_offset == [
        sum(len(t) for t in g.logprobs.tokens[:i]) for i in range(len(ids) + 3)
    ]
    streamed = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3,
        temperature=0, stream=True,
    )  # fmt: skip
    tokens = [t for ch in streamed for t in (ch.choices[0].logprobs.tokens or [])]  # type: ignore[union-attr]
    assert tokens == g.logprobs.tokens

    field = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    ).model_dump()["choices"][0]["prompt_logprobs"]  # fmt: skip
    assert field[0] is None and len(field) == len(ids)
    for entry, token, logprob in zip(field[1:], ids[1:], expected[1:], strict=True):
        assert entry[str(token)]["logprob"] == pytest.approx(logprob, abs=2e-3)
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 1, "prompt_logprobs": 1},
    ).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 10
    assert all(1 <= len(e) <= 2 for e in chat["prompt_logprobs"][1:])
    for body in ({"prompt": PROMPT, "max_tokens": 0},  # nothing to answer without echo
                 {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}):  # fmt: skip
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 400


def test_bad_words_and_token_ids_beside_the_text(server: ServerProcess) -> None:
    """vLLM's `bad_words`, `return_token_ids` (whole and streamed, both routes) and
    `return_tokens_as_token_ids`; `use_beam_search` and `priority` are refused, not ignored."""
    client = server.client()
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    free = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=8, temperature=0
    )
    word = free.choices[0].text.split()[0].strip(",.:")
    banned = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=8, temperature=0,
        extra_body={"bad_words": [word], "return_token_ids": True},
    ).model_dump()  # fmt: skip
    assert word not in banned["choices"][0]["text"]
    choice = banned["choices"][0]
    assert choice["prompt_token_ids"] == ids
    assert len(choice["token_ids"]) == banned["usage"]["completion_tokens"] == 8
    detok = httpx.post(server.url + "/detokenize", json={"tokens": choice["token_ids"]}).json()
    assert detok["prompt"] == choice["text"]
    streamed = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
        extra_body={"bad_words": [word], "return_token_ids": True},
    )  # fmt: skip
    chunks = [ch.model_dump()["choices"][0] for ch in streamed]
    assert chunks[0]["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == choice["token_ids"]

    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=6, temperature=0,  # type: ignore[arg-type]
        logprobs=True, extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    ).model_dump()  # fmt: skip
    assert len(chat["prompt_token_ids"]) > 10
    token_ids = chat["choices"][0]["token_ids"]
    assert [e["token"] for e in chat["choices"][0]["logprobs"]["content"]] == [
        f"token_id:{t}" for t in token_ids
    ]
    streamed_chat = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=6, temperature=0,  # type: ignore[arg-type]
            stream=True, extra_body={"return_token_ids": True},
        )
    )  # fmt: skip
    first = streamed_chat[0].model_dump()
    assert first["prompt_token_ids"] == chat["prompt_token_ids"]
    got = [
        t
        for ch in streamed_chat
        for c in ch.model_dump()["choices"]
        for t in c.get("token_ids") or []
    ]
    assert got == token_ids
    for extra in ({"use_beam_search": True}, {"priority": 1}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, **extra})
        assert r.status_code == 400, r.text


def test_tokenize_detokenize_version_models(server: ServerProcess) -> None:
    tok = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 2048
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == PROMPT
    assert httpx.get(server.url + "/version").json()["version"]
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    # X-Request-Id is honoured and echoed.
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_truncated_and_untruncated_concurrently_never_500(server: ServerProcess) -> None:
    words = " ".join(f"word{i % 97}" for i in range(3000))  # ~ 6,000 tokens: over 2,048

    def body_for(i: int) -> dict[str, object]:
        kind = i % 6
        body: dict[str, object] = {"max_tokens": 4}
        if kind == 0:  # as many as fit
            body.update(prompt=words, truncate_prompt_tokens=-1)
        elif kind in (1, 2):  # a fixed number of last tokens
            body.update(prompt=words[: 2000 * kind], truncate_prompt_tokens=50 + i)
        elif kind == 3:  # untruncated and too long: 400
            body.update(prompt=words)
        else:  # untruncated and short
            body.update(prompt=words[: 100 * i])
        return body

    async def one(i: int, client: httpx.AsyncClient) -> tuple[int, dict[str, object]]:
        resp = await client.post("/v1/completions", json=body_for(i))
        return resp.status_code, resp.json()

    async def run() -> list[tuple[int, dict[str, object]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(i, client) for i in range(18)))

    for i, (status, body) in enumerate(asyncio.run(run())):
        kind = i % 6
        if kind == 3:
            assert status == 400 and "maximum context length is 2048" in str(body["error"])
            continue
        assert status == 200, (i, status, body)
        usage = body["usage"]
        assert isinstance(usage, dict)
        if kind == 0:
            assert usage["prompt_tokens"] == 2048 - 4
        elif kind in (1, 2):
            assert usage["prompt_tokens"] == 50 + i


def test_usage_counts_every_generated_token_of_non_ascii_output(server: ServerProcess) -> None:
    """Non-ASCII output cut at max_tokens: completion_tokens is the tokens generated (a token
    that completes no character on its own used to go uncounted), streamed or not, n = 2."""
    client = server.client()
    model = "SmolLM2-135M-Instruct"
    for seed in range(12):
        common: dict[str, object] = {"model": model, "max_tokens": 6, "seed": seed,
                                     "extra_body": {"ignore_eos": True}}  # fmt: skip
        reply = client.completions.create(prompt="Translate 'hello' to Chinese:", n=2, **common)  # type: ignore[call-overload]
        assert [c.finish_reason for c in reply.choices] == ["length"] * 2
        assert reply.usage is not None and reply.usage.completion_tokens == 12, seed
        chunks = client.chat.completions.create(
            messages=[{"role": "user", "content": "Say hello in Chinese and add an emoji."}],
            stream=True, stream_options={"include_usage": True}, **common,  # type: ignore[call-overload]
        )  # fmt: skip
        usage = [c.usage for c in chunks if c.usage is not None]
        assert usage and usage[0].completion_tokens == 6, seed


def test_tokenize_with_no_messages_is_a_400(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/tokenize", json={"messages": []})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
