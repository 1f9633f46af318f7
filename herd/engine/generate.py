"""Token generation as a generator, the one interface the CLI (and later the server) consume.

This first engine recomputes the full forward for every new token: no KV cache yet, so it is
only fit for short outputs of small models. It stays as the reference that the cached engine
must reproduce token for token.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from herd.model.transformer import TextModel


def sample(logits_V: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           gen: torch.Generator | None) -> int:
    """One token id from float32 logits [V]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V / temperature, dim=-1)
    if top_k is not None and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@torch.inference_mode()
def generate_tokens(model: TextModel, prompt: list[int], max_new_tokens: int, stop_ids: frozenset[int] = frozenset(),
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one until a stop id (yielded too) or max_new_tokens."""
    if not prompt:
        raise ValueError("prompt must contain at least one token")
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt], device=model.output.weight.device)
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float().cpu()
        nxt = sample(logits, temperature, top_k, top_p, gen)
        yield nxt
        if nxt in stop_ids:
            return
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
