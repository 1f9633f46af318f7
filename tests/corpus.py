"""A small generated English corpus for training tests: seeded sentences from a tiny grammar,
paragraphs separated by blank lines (public domain by construction)."""

from __future__ import annotations

import random

_SUBJECTS = ["the old farmer", "a small dog", "the young queen", "my brother", "the tall sailor", "a red fox",
             "the baker", "our teacher", "the quiet child", "a grey cat"]
_VERBS = ["found", "carried", "painted", "watched", "followed", "opened", "lost", "cleaned", "built", "sold"]
_OBJECTS = ["a wooden box", "the green door", "an empty boat", "the long road", "a silver key", "the warm bread",
            "a broken chair", "the white horse", "an old map", "the stone bridge"]
_TAILS = ["in the morning", "near the river", "after the rain", "before dinner", "at the market", "by the sea",
          "under the moon", "in the garden", "on the hill", "at noon"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
    return s[0].upper() + s[1:]


def corpus(n_paragraphs: int, seed: int = 0, sentences: tuple[int, int] = (3, 8)) -> str:
    rng = random.Random(seed)
    paras = [" ".join(sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(n_paragraphs)]
    return "\n\n".join(paras) + "\n"
