"""Quality of a model on a text as the field measures it: perplexity, and against a reference model
(the same weights unquantized) the mean KL divergence of the next-token distributions and how often
both pick the same top token (llama.cpp's `llama-perplexity --kl-divergence` reports the same)."""

from __future__ import annotations

import math
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
            progress: bool = True) -> Quality:
    """Score ``ids`` in consecutive windows of ``window`` tokens (full forwards, each window on its own)."""
    if window < 2 or len(ids) < 2:
        raise ValueError(f"need a window of >= 2 tokens and >= 2 token ids, got window {window} and {len(ids)} ids")
    window = min(window, llm.config.text.max_seq_len)
    nll = ref_nll = kl = agree = 0.0
    n = 0
    starts = range(0, len(ids) - 1, window)
    for start in tqdm(starts, desc="scoring", unit="window", disable=not progress):
        chunk = torch.tensor([ids[start:start + window + 1]])
        x, target = chunk[:, :-1], chunk[0, 1:]
        logp = torch.log_softmax(llm.logits(x)[0].float(), -1)
        nll -= float(logp.gather(1, target[:, None]).sum())
        if reference is not None:
            ref = torch.log_softmax(reference.logits(x)[0].float(), -1)
            ref_nll -= float(ref.gather(1, target[:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        n += target.numel()
    if reference is None:
        return Quality(n, math.exp(nll / n))
    return Quality(n, math.exp(nll / n), math.exp(ref_nll / n), kl / n, agree / n)
