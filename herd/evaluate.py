"""Quality of a model on a text as the field measures it: perplexity, and against a reference model
(the same weights unquantized) the mean KL divergence of the next-token distributions and how often
both pick the same top token (llama.cpp's `llama-perplexity --kl-divergence` reports the same)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from herd.llm import LLM


@dataclass
class Quality:
    tokens: int  # next-token predictions scored
    perplexity: float
    reference_perplexity: float | None = None
    mean_kl: float | None = None  # KL(reference || model), nats per token
    top1_agreement: float | None = None


@torch.inference_mode()
def quality(llm: LLM, ids: list[int], reference: LLM | None = None, window: int = 1024,
            progress: bool = True, cached: bool = False) -> Quality:
    """Score ``ids`` in consecutive windows of ``window`` tokens, each window on its own: by full
    forwards, or with ``cached`` through each model's KV cache (its ``kv_dtype``), prefilled in
    segments as generation does. Only the cached path reads K/V back from a cache, so only it sees
    an int8 cache's rounding, in every query (the segment length changes the speed, not that)."""
    if window < 2 or len(ids) < 2:
        raise ValueError(f"need a window of >= 2 tokens and >= 2 token ids, got window {window} and {len(ids)} ids")
    window = min(window, llm.config.text.max_seq_len)
    score = _scorer(llm, window, cached)
    score_reference = _scorer(reference, window, cached) if reference is not None else None
    nll = ref_nll = kl = agree = 0.0
    n = 0
    starts = range(0, len(ids) - 1, window)
    for start in tqdm(starts, desc="scoring", unit="window", disable=not progress):
        chunk = torch.tensor([ids[start:start + window + 1]])
        x, target = chunk[:, :-1], chunk[0, 1:]
        logp = torch.log_softmax(score(x).float(), -1)
        nll -= float(logp.gather(1, target[:, None]).sum())
        if score_reference is not None:
            ref = torch.log_softmax(score_reference(x).float(), -1)
            ref_nll -= float(ref.gather(1, target[:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        n += target.numel()
    if reference is None:
        return Quality(n, math.exp(nll / n))
    return Quality(n, math.exp(nll / n), math.exp(ref_nll / n), kl / n, agree / n)


def _scorer(llm: LLM, window: int, cached: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Token ids [1, T] -> logits [T, V]: a full forward, or a prefill through a one-row cache."""
    if not cached:
        return lambda x: llm.logits(x)[0]
    engine = llm.engine(llm.model, rows=1, max_len=window, prefill_chunk=llm.prefill_chunk, kv_dtype=llm.kv_dtype,
                    kv_read_dtype=llm.kv_read_dtype)
    return lambda x: engine.prefill_logits(0, x[0].tolist())
