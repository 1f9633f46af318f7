"""From what a user asks (a string, token ids or chat messages; sampling options; stop strings) to
engine work, and from engine tokens back to text: the typed boundary `LLM.generate` / `LLM.stream` use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from herd.engine.generate import Engine, RowResult, Sampling, generate_rows
from herd.tokenizer.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from herd.llm import LLM


@dataclass
class Generation:
    """One finished generation: new tokens, their text, why it stopped, timings."""

    token_ids: list[int]  # new tokens; a stop token that ended it is included
    text: str  # the new text, without the stop token or stop string
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


def prepare(llm: LLM, prompt: Any) -> Prompt:
    """A string (raw text: <|begin_of_text|> + its tokens), token ids, or chat messages (with the
    generation prompt, images included) -> Prompt; every check happens here, before model work."""
    tok = llm.tokenizer
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        return Prompt(tok.encode(prompt, bos=True))
    if not isinstance(prompt, Sequence) or not prompt:
        raise ValueError("prompt must be a non-empty string, list of token ids, or list of chat messages; "
                         f"got {type(prompt).__name__ if prompt is not None else None!r}"
                         + (" (empty)" if isinstance(prompt, Sequence) else ""))
    if all(isinstance(p, Mapping) for p in prompt):
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True)
        if ids.pixel_values is None:
            return Prompt(list(ids))
        mask = torch.tensor(list(ids)) == tok.token_id("<|patch|>")
        return Prompt(list(ids), mask, llm.image_features(ids.pixel_values, int(mask.sum())))
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        V = llm.config.text.vocab_size
        bad = [p for p in prompt if not 0 <= p < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
        if tok.token_id("<|patch|>") in prompt:
            raise ValueError("token ids hold <|patch|> tokens: pass chat messages with the images instead")
        return Prompt(list(prompt))
    raise ValueError("prompt must be a string, a list of token ids, or a list of chat message dicts")


def check_request(llm: LLM, prompts: Sequence[Prompt], max_new_tokens: int, stop: Sequence[str] | None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    limit = llm.config.text.max_seq_len
    for i, p in enumerate(prompts):
        if len(p.ids) + max_new_tokens > limit:
            raise ValueError(f"prompt {i}: {len(p.ids)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"model's context of {limit} tokens")


class _TextTracker:
    """Incremental text of one row, holding back what could still become a stop string."""

    def __init__(self, llm: LLM, stop: Sequence[str]):
        self.decoder, self.stop, self.stop_ids = StreamDecoder(llm.tokenizer), list(stop), llm.tokenizer.stop_ids
        self.text, self.sent, self.hit = "", 0, False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        if token not in self.stop_ids:
            self.text += self.decoder.push(token)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.hit = self.text[:at], True
        hold = 0 if self.hit else max((len(s) - 1 for s in self.stop), default=0)
        ready = self.text[self.sent:max(self.sent, len(self.text) - hold)]
        self.sent += len(ready)
        return ready

    def finish(self) -> str:
        if not self.hit:
            self.text += self.decoder.flush()
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return rest


def run(llm: LLM, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling,
        stop: Sequence[str] | None) -> Iterator[tuple[int, str, list[RowResult], list[_TextTracker]]]:
    """Yield (row, newly visible text, results, trackers) as tokens come; stop strings end a row."""
    check_request(llm, prompts, max_new_tokens, stop)
    engine = Engine(llm.model, rows=len(prompts), max_len=max(len(p.ids) for p in prompts) + max_new_tokens,
                    prefill_chunk=llm.prefill_chunk, kv_dtype=llm.kv_dtype)
    trackers = [_TextTracker(llm, stop or ()) for _ in prompts]
    images = [(p.image_mask, p.image_features) if p.image_mask is not None else None for p in prompts]
    for row, token, results in generate_rows(engine, [p.ids for p in prompts], max_new_tokens,
                                             llm.tokenizer.stop_ids, sampling, images):
        piece = trackers[row].push(token)
        if trackers[row].hit:
            results[row].stop_reason = "stop"
        if results[row].stop_reason is not None:
            piece += trackers[row].finish()
        yield row, piece, results, trackers


def stream(llm: LLM, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling,
           stop: Sequence[str] | None) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as text becomes final; returns the Generations (StopIteration.value)."""
    start = time.perf_counter()
    results, trackers = [], []
    for row, piece, results, trackers in run(llm, prompts, max_new_tokens, sampling, stop):
        if piece:
            yield row, piece
    total = time.perf_counter() - start
    prefill = sum(r.prefill_s for r in results)
    return [Generation(r.token_ids, t.text, r.stop_reason, len(p.ids), r.prefill_s, total - prefill)
            for r, t, p in zip(results, trackers, prompts)]


def generate(llm: LLM, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling,
             stop: Sequence[str] | None) -> list[Generation]:
    pieces = stream(llm, prompts, max_new_tokens, sampling, stop)
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value
