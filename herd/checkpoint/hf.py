"""Hugging Face <-> herd state-dict conversion, as pure functions over (lazy) mappings.

herd's own parameter names follow Meta's reference (``layers.{i}.attention.wq.weight``,
``layers.{i}.feed_forward.experts.w1``, ...; experts are stored (out, in) per expert: w1/w3 [E, F, D],
w2 [E, D, F], the transpose of Meta's and HF's files). Hugging Face stores the text model under
``model.`` (Llama4ForCausalLM) or ``language_model.model.`` (Llama4ForConditionalGeneration,
beside ``vision_model.*`` and ``multi_modal_projector.*``) and fuses each layer's experts:
``gate_up_proj`` [E, D, 2F] (gate first) and ``down_proj`` [E, F, D].

Each converter is a *plan*: herd key -> (source keys, combine function). Running a plan over a
mapping whose values are meta tensors checks every name, shape and dtype before a byte is read;
running it over memory-mapped tensors streams the real weights one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from herd.config import TextConfig, VisionConfig

Combine = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]
    combine: Combine = lambda t: t


def run_plan(plan: dict[str, Recipe], sd: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (target key, tensor) for every entry of a plan, reading sources from ``sd`` lazily."""
    for key, recipe in plan.items():
        yield key, recipe.combine(*(sd[s] for s in recipe.sources))


def _swap(t: torch.Tensor) -> torch.Tensor:
    """[E, a, b] -> [E, b, a]: HF's (and Meta's) x @ W expert layout <-> herd's (out, in) one."""
    return t.transpose(1, 2)


def _first_half(t: torch.Tensor) -> torch.Tensor:  # gate of gate_up_proj [E, D, 2F], as [E, F, D]
    return _swap(t[..., : t.shape[-1] // 2])


def _second_half(t: torch.Tensor) -> torch.Tensor:  # up of gate_up_proj, as [E, F, D]
    return _swap(t[..., t.shape[-1] // 2:])


def _fuse(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.cat([_swap(w1), _swap(w3)], dim=-1).contiguous()


def _swapped(t: torch.Tensor) -> torch.Tensor:
    return _swap(t).contiguous()


# (herd suffix, HF suffix) for everything that is a plain rename, per layer kind.
_ATTN = [("attention_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight")] + [
    (f"attention.w{a}.weight", f"self_attn.{b}_proj.weight") for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))]
_DENSE = [(f"feed_forward.{a}.weight", f"feed_forward.{b}_proj.weight")
          for a, b in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
_MOE = [("feed_forward.router.weight", "feed_forward.router.weight")] + [
    (f"feed_forward.shared_expert.{a}.weight", f"feed_forward.shared_expert.{b}_proj.weight")
    for a, b in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]

TEXT_LAYOUTS = {  # prefix of the text decoder, key of the output head
    "causal": ("model.", "lm_head.weight"),
    "multimodal": ("language_model.model.", "language_model.lm_head.weight"),
}


def detect_layout(keys) -> str:
    """'multimodal' or 'causal' from the key names of a Hugging Face checkpoint."""
    keys = set(keys)
    for name, (prefix, _) in TEXT_LAYOUTS.items():
        if prefix + "embed_tokens.weight" in keys:
            return name
    raise KeyError("no 'model.embed_tokens.weight' or 'language_model.model.embed_tokens.weight' tensor")


def _renames(cfg: TextConfig) -> list[tuple[str, str]]:
    """(herd key, HF key relative to the text prefix) for every renamed tensor; lm_head handled apart."""
    pairs = [("tok_embeddings.weight", "embed_tokens.weight"), ("norm.weight", "norm.weight")]
    for i in range(cfg.n_layers):
        for a, b in _ATTN + (_MOE if cfg.is_moe[i] else _DENSE):
            pairs.append((f"layers.{i}.{a}", f"layers.{i}.{b}"))
    return pairs


def per_expert(keys, layout: str) -> bool:
    """Whether a checkpoint stores its routed experts one by one (``experts.{e}.gate_proj.weight``,
    as quantized checkpoints do) rather than fused (``experts.gate_up_proj``)."""
    prefix = TEXT_LAYOUTS[layout][0]
    return any(k.startswith(prefix + "layers.") and ".feed_forward.experts.0.gate_proj." in k for k in keys)


_EXPERT_LINEARS = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


def stack_experts(*parts):
    """Experts stored one by one [out, in] each -> herd's stack [E, out, in] (tensors, or the
    quantized weights of herd.checkpoint.compressed, which stack themselves)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.stack(parts)
    return type(parts[0]).stack(list(parts))


def hf_plan(cfg: TextConfig, layout: str, experts_one_by_one: bool = False) -> dict[str, Recipe]:
    """herd key -> Recipe over Hugging Face keys."""
    prefix, head = TEXT_LAYOUTS[layout]
    plan = {ours: Recipe((prefix + theirs,)) for ours, theirs in _renames(cfg)}
    plan["output.weight"] = Recipe((head,))
    for i in range(cfg.n_layers):
        if cfg.is_moe[i] and experts_one_by_one:
            e = f"{prefix}layers.{i}.feed_forward.experts."
            for ours, theirs in _EXPERT_LINEARS:
                plan[f"layers.{i}.feed_forward.experts.{ours}"] = Recipe(
                    tuple(f"{e}{j}.{theirs}.weight" for j in range(cfg.moe.num_experts)), stack_experts)
        elif cfg.is_moe[i]:
            fused = (f"{prefix}layers.{i}.feed_forward.experts.gate_up_proj",)
            plan[f"layers.{i}.feed_forward.experts.w1"] = Recipe(fused, _first_half)
            plan[f"layers.{i}.feed_forward.experts.w3"] = Recipe(fused, _second_half)
            plan[f"layers.{i}.feed_forward.experts.w2"] = Recipe(
                (f"{prefix}layers.{i}.feed_forward.experts.down_proj",), _swap)
    return plan


def to_hf_plan(cfg: TextConfig, layout: str, experts_one_by_one: bool = False) -> dict[str, Recipe]:
    """Hugging Face key -> Recipe over herd keys (the inverse of :func:`hf_plan`)."""
    prefix, head = TEXT_LAYOUTS[layout]
    plan = {prefix + theirs: Recipe((ours,)) for ours, theirs in _renames(cfg)}
    plan[head] = Recipe(("output.weight",))
    for i in range(cfg.n_layers):
        if cfg.is_moe[i] and experts_one_by_one:
            for ours, theirs in _EXPERT_LINEARS:
                for j in range(cfg.moe.num_experts):
                    plan[f"{prefix}layers.{i}.feed_forward.experts.{j}.{theirs}.weight"] = Recipe(
                        (f"layers.{i}.feed_forward.experts.{ours}",), lambda t, j=j: t[j])
        elif cfg.is_moe[i]:
            e = f"layers.{i}.feed_forward.experts."
            plan[f"{prefix}{e}gate_up_proj"] = Recipe((e + "w1", e + "w3"), _fuse)
            plan[f"{prefix}{e}down_proj"] = Recipe((e + "w2",), _swapped)
    return plan


def from_hf(sd: Mapping[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """herd state dict from a Hugging Face one (either layout)."""
    return dict(run_plan(hf_plan(cfg, detect_layout(sd.keys())), sd))


def to_hf(sd: Mapping[str, torch.Tensor], cfg: TextConfig, layout: str = "causal",
          experts_one_by_one: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (``layout`` 'causal' or 'multimodal') from a herd one."""
    return dict(run_plan(to_hf_plan(cfg, layout, experts_one_by_one), sd))


# ---- vision encoder, adapter and projector (Llama4ForConditionalGeneration only) ----------------


def _vision_renames(v: VisionConfig) -> list[tuple[str, str]]:
    """(herd key under ``vision.``, HF key) for every vision tensor; all plain renames."""
    vm = "vision_model."
    pairs = [("patch_embed.weight", vm + "patch_embedding.linear.weight"), ("class_token", vm + "class_embedding"),
             ("pos_embed", vm + "positional_embedding_vlm"),
             ("adapter_fc1.weight", vm + "vision_adapter.mlp.fc1.weight"),
             ("adapter_fc2.weight", vm + "vision_adapter.mlp.fc2.weight"),
             ("projector.weight", "multi_modal_projector.linear_1.weight")]
    pairs += [(f"{a}.{p}", f"{vm}{b}.{p}") for a, b in (("norm_pre", "layernorm_pre"), ("norm_post", "layernorm_post"))
              for p in ("weight", "bias")]
    layer = [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("mlp.fc1", "mlp.fc1"),
             ("mlp.fc2", "mlp.fc2")] + [(f"attn.w{x}", f"self_attn.{x}_proj") for x in "qkvo"]
    for i in range(v.n_layers):
        pairs += [(f"layers.{i}.{a}.{p}", f"{vm}model.layers.{i}.{b}.{p}") for a, b in layer for p in ("weight", "bias")]
    return [("vision." + ours, theirs) for ours, theirs in pairs]


def hf_vision_plan(v: VisionConfig) -> dict[str, Recipe]:
    """``vision.*`` herd key -> Recipe over Hugging Face keys."""
    return {ours: Recipe((theirs,)) for ours, theirs in _vision_renames(v)}


def to_hf_vision_plan(v: VisionConfig) -> dict[str, Recipe]:
    """Hugging Face vision key -> Recipe over ``vision.*`` herd keys."""
    return {theirs: Recipe((ours,)) for ours, theirs in _vision_renames(v)}
