"""Llama 4's vocabulary layout: 200,000 BPE ids, then 2,048 special tokens in Meta's order."""

from __future__ import annotations

NUM_SPECIAL = 2048
LLAMA4_VOCAB_SIZE = 200_000 + NUM_SPECIAL


def _reserved(kind: str, start: int, stop: int) -> list[str]:
    return [f"<|{kind}reserved_special_token_{i}|>" for i in range(start, stop)]


def llama4_special_tokens() -> list[str]:
    """The 2,048 special token names in id order (name i has id 200000 + i), as Meta defines them."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    # 200005..200079: chat post-training tokens; named ones took over some reserved slots (6, 7).
    names += ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    names += _reserved("text_post_train_", 0, 6)
    names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    names += _reserved("text_post_train_", 8, 69)
    # 200080..201133: vision (image framing, tile separators, patch placeholders).
    names += ["<|image_start|>", "<|image_end|>", *_reserved("vision_", 0, 2)]
    names += ["<|tile_x_separator|>", "<|tile_y_separator|>", *_reserved("vision_", 2, 6)]
    names += ["<|image|>", *_reserved("vision_", 6, 7), "<|patch|>", *_reserved("vision_", 7, 1048)]
    # 201134..201143: reasoning.
    names += [*_reserved("reasoning_", 0, 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    names += _reserved("", 0, NUM_SPECIAL - len(names))
    return names
