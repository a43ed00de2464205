"""In-process inference shaped like vLLM's offline API: `LLM().generate(...)` and `.chat(...)`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from headrace.config import (
    CacheConfig,
    DType,
    EngineConfig,
    KVCacheDType,
    ModelConfig,
    SchedulerConfig,
    dtype_name,
    kv_cache_dtype_name,
)
from headrace.engine.core import EngineCore
from headrace.frontend.output import (
    Choice,
    OutputProcessor,
    RequestStream,
    SeqState,
    fan_out,
    new_detokenizer,
)
from headrace.frontend.tokenize import bad_words_token_ids
from headrace.model.loader import load_tokenizer, resolve_model_path
from headrace.wire.messages import SamplingParams, TokenLogprobs

Conversation = list[dict[str, Any]]
PromptInput = str | list[int] | dict[str, Any]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    """Everything generated for one prompt (`n` sequences)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = True
    # with SamplingParams.prompt_logprobs: per prompt token, None for the first (vLLM's shape)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    `LLM()` loads the bundled SmolLM2-135M-Instruct. Engine arguments mirror `headrace serve`'s
    flags: dtype, device, max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
    num_kv_blocks, kv_cache_memory, enable_prefix_caching, kv_cache_dtype, calculate_kv_scales,
    seed.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: DType | str = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int = 2 << 30,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: KVCacheDType | str = "auto",
        calculate_kv_scales: bool = False,
        seed: int = 0,
    ) -> None:
        self._start(
            EngineConfig(
                model=ModelConfig(model, dtype_name(dtype), device, max_model_len, seed),
                cache=CacheConfig(
                    block_size,
                    num_kv_blocks,
                    kv_cache_memory,
                    enable_prefix_caching,
                    kv_cache_dtype_name(kv_cache_dtype),
                    calculate_kv_scales,
                ),
                scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens),
            )
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An LLM from a ready EngineConfig (what `headrace serve`'s flags parse to)."""
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = EngineCore(config)
        self.tokenizer = load_tokenizer(resolve_model_path(config.model.model))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is text, token ids, or a dict with
        `prompt` or `prompt_token_ids`."""
        single = isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        batch = cast(list[PromptInput], [prompts] if single else list(prompts))
        items: list[tuple[str | None, list[int]]] = []
        for p in batch:
            value = p.get("prompt_token_ids", p.get("prompt")) if isinstance(p, dict) else p
            if isinstance(value, str):
                items.append((value, list(self.tokenizer(value).input_ids)))
            elif isinstance(value, list):
                items.append((None, [int(t) for t in value]))
            else:
                raise TypeError(f"unsupported prompt {p!r}")
        return self._run(items, sampling_params)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template (the model's, or `chat_template`'s
        text; `tools` are passed to it, as vLLM's `LLM.chat` does), then generate."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = cast(list[Conversation], [messages] if single else list(messages))
        items: list[tuple[str | None, list[int]]] = []
        for conv in convs:
            text = self.tokenizer.apply_chat_template(
                conv,
                tools=tools,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            items.append((text, list(self.tokenizer(text, add_special_tokens=False).input_ids)))
        return self._run(items, sampling_params)

    def _run(
        self,
        items: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError("sampling_params must be one per prompt")
        # The API server's own fan-out and output processing (stop strings, detokenizing).
        output = OutputProcessor()
        streams: list[tuple[RequestStream, RequestOutput]] = []
        try:
            # Inside the try: a prompt the engine refuses must not strand the ones added before it.
            for (text, ids), params in zip(items, params_list, strict=True):
                streams.append(self._add(output, text, ids, params))
            self._drain(output, streams)
        except BaseException:
            self.engine.abort(list(output.seqs))
            raise
        return [result for _, result in streams]

    def _add(
        self, output: OutputProcessor, text: str | None, ids: list[int], params: SamplingParams
    ) -> tuple[RequestStream, RequestOutput]:
        rid = str(next(self._ids))
        if params.bad_words and params.bad_words_token_ids is None:
            words = bad_words_token_ids(self._encode_plain, params.bad_words)
            params = msgspec.structs.replace(params, bad_words_token_ids=words)
        stream = RequestStream(rid, [ids])
        want_logprobs = params.logprobs is not None
        for index, msg in fan_out(rid, [ids], params, time.time()):
            detok = new_detokenizer(self.tokenizer, ids, params)
            output.add(SeqState(msg.request_id, index, 0, detok, stream, want_logprobs, len(ids)))
            self.engine.add_request(msg)
        return stream, RequestOutput(rid, text, ids)

    def _drain(
        self, output: OutputProcessor, streams: list[tuple[RequestStream, RequestOutput]]
    ) -> None:
        """Step the engine until every choice ended; a stop string found in the text aborts its
        request in the engine at once (its blocks are freed)."""
        while self.engine.has_unfinished_requests():
            stopped = output.process(self.engine.step())
            if stopped:
                self.engine.abort(stopped)
        for stream, result in streams:
            choices = {s.index: Choice(s.index) for s in stream.seqs}
            while not stream.queue.empty():
                d = stream.queue.get_nowait()
                if isinstance(d, BaseException):
                    raise d
                choices[d.index].add(d)
            result.num_cached_tokens = stream.num_cached_tokens
            first = choices[min(choices)]
            if first.prompt_logprobs is not None:
                result.prompt_logprobs = [None, *first.prompt_logprobs]
            result.outputs = [
                CompletionOutput(
                    c.index,
                    c.text,
                    c.token_ids,
                    c.finish_reason,
                    c.stop_reason,
                    c.logprobs if stream.seqs[0].want_logprobs else None,
                )
                for c in (choices[i] for i in sorted(choices))
            ]
