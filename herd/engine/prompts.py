"""From what a user asks (a string, token ids or chat messages; sampling options; stop strings) to
engine work, and from engine tokens back to text: the typed boundary `LLM.generate` / `LLM.stream` use.
Functions here take the parts they need (model, tokenizer, image encoder), never the LLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from herd.engine.batch import Batcher, Job
from herd.engine.generate import Engine, Sampling
from herd.model.transformer import TextModel
from herd.tokenizer.chat_format import ChatPrompt, ChatTokenizer

# Image tiles [n, 3, S, S] and the prompt's <|patch|> count -> features [n * tokens per tile, D].
ImageEncoder = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Generation:
    """One finished generation: new tokens, their text, why it stopped, timings."""

    # Every token generated, the way the model produced them: the stop token that ended it and the
    # tokens that spelled a stop string included (a token can straddle the string's start), so the
    # ids continue a conversation or parse as a reply (tokenizer.parse_assistant) exactly.
    token_ids: list[int]
    text: str  # the reply as a user reads it: cut before the stop string, without the stop token
    stop_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0


@dataclass
class Prompt:
    """A prompt as the engine takes it: ids plus, with images, the <|patch|> mask and image features."""

    ids: list[int]
    image_mask: torch.Tensor | None = None
    image_features: torch.Tensor | None = None


def is_batch(prompt: Any) -> bool:
    """A list of prompts (strings, id lists or message lists), as opposed to one prompt."""
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
        return False
    return not all(isinstance(p, int) for p in prompt) and not all(isinstance(p, Mapping) for p in prompt)


def prepare(tokenizer: ChatTokenizer, prompt: Any, tools: Sequence[Mapping] | None = None,
            image_features: ImageEncoder | None = None) -> Prompt:
    """A string (raw text: <|begin_of_text|> + its tokens), token ids, a ChatPrompt (what
    apply_chat_template returns, images included), or chat messages (with the generation prompt,
    images included, ``tools`` offered) -> Prompt; every check happens here, before model work."""
    if isinstance(prompt, ChatPrompt):
        if tools is not None:
            raise ValueError("tools are offered when the prompt is made: apply_chat_template(messages, tools=...)")
        return chat_prompt(tokenizer, prompt, image_features)
    if tools is not None and not (isinstance(prompt, Sequence) and prompt and
                                  all(isinstance(p, Mapping) for p in prompt)):
        raise ValueError("tools are offered in chat messages: pass a list of messages with tools=, or the prompt "
                         "llm.tokenizer.apply_chat_template(messages, tools=...) returns")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        return Prompt(tokenizer.encode(prompt, bos=True))
    if not isinstance(prompt, Sequence) or not prompt:
        raise ValueError("prompt must be a non-empty string, list of token ids, ChatPrompt, or list of chat messages; "
                         f"got {type(prompt).__name__ if prompt is not None else None!r}"
                         + (" (empty)" if isinstance(prompt, Sequence) else ""))
    if all(isinstance(p, Mapping) for p in prompt):
        chat = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tools=tools)
        return chat_prompt(tokenizer, chat, image_features)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        V = tokenizer.vocab_size
        bad = [p for p in prompt if not 0 <= p < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
        if tokenizer.token_id("<|patch|>") in prompt:
            raise ValueError("token ids hold <|patch|> tokens but carry no images: pass chat messages, or the "
                             "ChatPrompt apply_chat_template returned for them")
        return Prompt(list(prompt))
    raise ValueError("prompt must be a string, a list of token ids, a ChatPrompt, or a list of chat message dicts")


def chat_prompt(tokenizer: ChatTokenizer, chat: ChatPrompt, image_features: ImageEncoder | None) -> Prompt:
    """A ChatPrompt -> Prompt, running the vision encoder on its images."""
    if chat.pixel_values is None:
        return Prompt(list(chat.ids))
    if image_features is None:
        raise ValueError(f"image 0: {tokenizer.no_images_reason}, so the prompt cannot carry images")
    mask = torch.tensor(chat.ids) == tokenizer.token_id("<|patch|>")
    return Prompt(list(chat.ids), mask, image_features(chat.pixel_values, int(mask.sum())))


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """``stop`` as a list: one string or a list of them (as OpenAI takes it), each non-empty."""
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return []
    if isinstance(stop, (bytes, Mapping)) or not isinstance(stop, Sequence) or \
            not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stop)


def check_request(model: TextModel, prompts: Sequence[Prompt], max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = model.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if len(p.ids) + max_new_tokens > limit:
            raise ValueError(f"prompt {i}: {len(p.ids)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"model's context of {limit} tokens")


@dataclass(frozen=True)
class Runner:
    """What generation needs: the model and tokenizer, and the engine's settings."""

    model: TextModel
    tokenizer: ChatTokenizer
    prefill_chunk: int | None = None
    kv_dtype: torch.dtype | None = None
    kv_read_dtype: torch.dtype | None = None  # an int8 cache's float dtype for attention
    engine: Callable[..., Engine] = Engine  # makes each request's Engine (herd.distributed: a leader's)
    speculate: int = 0  # prompt-lookup draft tokens per step (herd.engine.batch.Batcher)


def run(runner: Runner, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling,
        stop: str | Sequence[str] | None) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, newly final text) as tokens come; returns the finished Jobs
    (StopIteration.value). All prompts join one batch; each leaves it when it ends."""
    stop = stop_strings(stop)
    check_request(runner.model, prompts, max_new_tokens)
    engine = runner.engine(runner.model, rows=len(prompts), max_len=max(len(p.ids) for p in prompts) + max_new_tokens,
                    prefill_chunk=runner.prefill_chunk, kv_dtype=runner.kv_dtype, kv_read_dtype=runner.kv_read_dtype)
    batcher = Batcher(engine, runner.tokenizer, runner.speculate)
    pieces: list[tuple[int, str]] = []
    jobs = [Job(p.ids, max_new_tokens, sampling, stop or (), image_mask=p.image_mask, image_features=p.image_features,
                on_event=lambda job, text, i=i: pieces.append((i, text))) for i, p in enumerate(prompts)]
    batcher.add(*jobs)
    yield from _drain(pieces)
    while batcher.seats:
        batcher.step()
        yield from _drain(pieces)
    return jobs


def _drain(pieces: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    for i, text in pieces:
        if text:
            yield i, text
    pieces.clear()


def stream(runner: Runner, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling,
           stop: Sequence[str] | None) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as text becomes final; returns the Generations (StopIteration.value)."""
    jobs = yield from run(runner, prompts, max_new_tokens, sampling, stop)
    for i, job in enumerate(jobs):
        if job.stop_reason == "error":  # the other prompts ran to their end; this one cannot be returned
            raise RuntimeError(f"prompt {i}: generation failed: {job.error}")
    return [Generation(j.token_ids, j.text, j.stop_reason, len(p.ids), j.prefill_s, j.decode_s)
            for j, p in zip(jobs, prompts)]


def generate(runner: Runner, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling,
             stop: Sequence[str] | None) -> list[Generation]:
    pieces = stream(runner, prompts, max_new_tokens, sampling, stop)
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value
