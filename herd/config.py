"""Typed, frozen configs for the Llama 4 family, and the named presets.

A config is built one of three ways: from a Hugging Face ``config.json`` (:func:`from_hf_config`),
from Meta's ``params.json`` (:func:`from_meta_params`) or from a preset name (:data:`PRESETS`).
Per-layer structure (which layers use RoPE, which are MoE) is resolved here, once, into explicit
tuples; model code reads ``cfg.uses_rope[i]`` and ``cfg.is_moe[i]`` and never re-derives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from herd.vocab import NUM_SPECIAL, llama4_special_tokens

LLAMA4_VOCAB = 202_048  # 200,000 BPE ranks + 2,048 special tokens


class ConfigError(ValueError):
    """A config field is missing, unknown, out of range or contradicts another."""


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout: factor 16, low 1, high 1, original 8192)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_context: int = 8192


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts of one MoE layer; every MoE layer also has one shared expert of the same width."""

    num_experts: int
    top_k: int
    expert_dim: int  # F of each routed expert and of the shared expert

    def __post_init__(self):
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_dim < 1:
            raise ConfigError(f"moe.expert_dim must be >= 1, got {self.expert_dim}")


@dataclass(frozen=True)
class VisionConfig:
    """The vision encoder (issue 3 builds the encoder; the shapes are kept here already)."""

    image_size: int = 336
    patch_size: int = 14
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_dim: int = 5632
    output_dim: int = 4096  # width after the pixel-shuffle adapter MLP
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    rope_theta: float = 10000.0

    def param_count(self, text_dim: int) -> int:
        d, p = self.dim, self.patch_size
        n_patches = (self.image_size // p) ** 2 + 1  # + class token
        per_layer = 4 * (d * d + d) + 2 * (2 * d) + (d * self.mlp_dim + self.mlp_dim) + (self.mlp_dim * d + d)
        shuffled = int(d / (self.pixel_shuffle_ratio**2))
        adapter = shuffled * self.projector_input_dim + self.projector_output_dim * self.projector_output_dim
        return (
            3 * p * p * d + d + n_patches * d + 4 * d  # patch embed, class token, positions, pre/post norms
            + self.n_layers * per_layer
            + adapter
            + self.output_dim * text_dim  # projection into the text width (no bias)
        )


@dataclass(frozen=True)
class TextConfig:
    """The text decoder. ``uses_rope[i]`` / ``is_moe[i]`` give layer i's kind explicitly."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # width of the dense SwiGLU layers (Maverick's non-MoE half)
    uses_rope: tuple[bool, ...]  # False: NoPE layer (global causal attention + temperature tuning)
    is_moe: tuple[bool, ...]
    moe: MoEConfig | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    use_qk_norm: bool = True  # on RoPE layers only; Maverick ships without it
    attention_chunk_size: int | None = 8192  # None: RoPE layers attend causally over everything
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    max_seq_len: int = 10_485_760  # advertised context; nothing is precomputed up to it

    def __post_init__(self):
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embedding, got {self.head_dim}")
        for name in ("uses_rope", "is_moe"):
            if len(getattr(self, name)) != self.n_layers:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries for n_layers={self.n_layers}")
        if any(self.is_moe) and self.moe is None:
            raise ConfigError("is_moe marks MoE layers but the config has no moe section")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ConfigError(f"attention_chunk_size must be >= 1 or null, got {self.attention_chunk_size}")
        if self.floor_scale <= 0:
            raise ConfigError(f"floor_scale must be > 0, got {self.floor_scale}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")

    # -- parameter counts (embedding and output head included; they dominate small models) --

    def _layer_params(self, i: int, active: bool) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 2 * d  # q, k, v, o + two norms
        if not self.is_moe[i]:
            return attn + 3 * d * self.ffn_dim
        m = self.moe
        experts = m.top_k if active else m.num_experts
        return attn + d * m.num_experts + (experts + 1) * 3 * d * m.expert_dim  # router, routed + shared

    def param_count(self, active: bool = False) -> int:
        """Parameters of the text model; ``active=True`` counts only those one token uses."""
        outer = 2 * self.vocab_size * self.dim + self.dim  # embedding, output head, final norm
        return outer + sum(self._layer_params(i, active) for i in range(self.n_layers))


@dataclass(frozen=True)
class ModelConfig:
    """Everything a checkpoint describes: text decoder, optional vision encoder, provenance."""

    text: TextConfig
    vision: VisionConfig | None = None
    name: str = "custom"
    note: str = ""  # e.g. "dimensions are an estimate" for Behemoth

    def param_count(self, active: bool = False) -> int:
        """Total parameters (vision encoder included), or with ``active`` those one text token uses."""
        vision = self.vision.param_count(self.text.dim) if self.vision and not active else 0
        return self.text.param_count(active) + vision


# ---------------------------------------------------------------------------------------------
# Layouts


def every(n_layers: int, step: int | None) -> tuple[bool, ...]:
    """True for layers (step-1, 2*step-1, ...): Meta's "(i + 1) % step == 0" rule."""
    if step is None or step <= 0:
        return (False,) * n_layers
    return tuple((i + 1) % step == 0 for i in range(n_layers))


def rope_layout(n_layers: int, nope_interval: int | None) -> tuple[bool, ...]:
    """uses_rope per layer: every ``nope_interval``-th layer is NoPE (layers 3, 7, 11 for 4)."""
    return tuple(not nope for nope in every(n_layers, nope_interval))


# ---------------------------------------------------------------------------------------------
# Meta's params.json


def meta_ffn_dims(dim: int, ffn_exp: float | None, ffn_dim_multiplier: float | None, multiple_of: int,
                  capacity_factor: float = 1.0, auto_scale_F: bool = True) -> tuple[int, int]:
    """(dense FFN width, expert width) exactly as Meta's reference derives them from params.json."""

    def round_up(x: int) -> int:
        return x + (-x % multiple_of)

    dense = int(2 * int(4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        dense = int(ffn_dim_multiplier * dense)
    dense = round_up(dense)
    expert = int(2 * int((ffn_exp or 4) * dim) / 3)
    expert = int((ffn_dim_multiplier or 1.0) * expert)
    if auto_scale_F:  # keeps an expert's active params equal to a dense layer's share
        expert = int(expert / (capacity_factor + 1))
    return dense, round_up(expert)


_META_KEYS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "multiple_of", "ffn_dim_multiplier",
    "ffn_exp", "norm_eps", "attention_chunk_size", "rope_theta", "use_scaled_rope", "rope_scaling_factor",
    "rope_high_freq_factor", "nope_layer_interval", "use_qk_norm", "attn_temperature_tuning", "floor_scale",
    "attn_scale", "vision_args", "moe_args", "quantization_args", "lora_args", "max_batch_size", "max_seq_len",
}


def _require(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return d[key]


def from_meta_params(params: dict, where: str = "params.json") -> ModelConfig:
    """ModelConfig from Meta's params.json (the fields of llama_models' ModelArgs)."""
    unknown = sorted(set(params) - _META_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}")
    dim, n_layers, n_heads = (_require(params, k, where) for k in ("dim", "n_layers", "n_heads"))
    n_kv = params.get("n_kv_heads") or n_heads
    if dim % n_heads:
        raise ConfigError(f"{where}: dim ({dim}) is not a multiple of n_heads ({n_heads})")
    head_dim = params.get("head_dim") or dim // n_heads
    moe_args = params.get("moe_args")
    dense, expert = meta_ffn_dims(
        dim, params.get("ffn_exp"), params.get("ffn_dim_multiplier"), params.get("multiple_of", 256),
        (moe_args or {}).get("capacity_factor", 1.0), (moe_args or {}).get("auto_scale_F", True),
    )
    moe, is_moe = None, (False,) * n_layers
    if moe_args:
        unknown = sorted(set(moe_args) - {"num_experts", "capacity_factor", "auto_scale_F", "top_k",
                                           "interleave_moe_layer_step"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) in moe_args {unknown}")
        moe = MoEConfig(_require(moe_args, "num_experts", where + " moe_args"), moe_args.get("top_k", 1), expert)
        is_moe = every(n_layers, moe_args.get("interleave_moe_layer_step", 1))
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's ModelArgs defaults: only Scout uses scaled RoPE and its params.json omits the factors.
        scaling = RopeScaling(factor=params.get("rope_scaling_factor") or 16.0,
                              high_freq_factor=params.get("rope_high_freq_factor") or 1.0)
    text = TextConfig(
        vocab_size=_require(params, "vocab_size", where), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=dense,
        uses_rope=rope_layout(n_layers, params.get("nope_layer_interval")), is_moe=is_moe, moe=moe,
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 500_000.0),
        rope_scaling=scaling, use_qk_norm=params.get("use_qk_norm", False),
        attention_chunk_size=params.get("attention_chunk_size"),
        attn_temperature_tuning=bool(params.get("attn_temperature_tuning", False)),
        floor_scale=params.get("floor_scale", 8192.0), attn_scale=params.get("attn_scale", 0.1),
    )
    vision = None
    if va := params.get("vision_args"):
        size, patch = _require(va, "image_size", where + " vision_args"), _require(va, "patch_size", where)
        vision = VisionConfig(
            image_size=size["height"], patch_size=patch["height"], dim=va["dim"], n_layers=va["n_layers"],
            n_heads=va["n_heads"], mlp_dim=int(va["dim"] * va["mlp_ratio"]), output_dim=va["output_dim"],
            pixel_shuffle_ratio=va["pixel_shuffle_ratio"], projector_input_dim=va["output_dim"],
            projector_output_dim=va["output_dim"],
        )
    return ModelConfig(text=text, vision=vision, name="meta")


def to_meta_params(cfg: ModelConfig) -> dict:
    """params.json for a config whose layout Meta's ModelArgs can express (tests build Meta checkpoints)."""
    t = cfg.text
    nope = [i for i, r in enumerate(t.uses_rope) if not r]
    interval = nope[0] + 1 if nope else None
    if rope_layout(t.n_layers, interval) != t.uses_rope:
        raise ConfigError("Meta's params.json can only express a NoPE layer every k layers")
    p = dict(dim=t.dim, n_layers=t.n_layers, n_heads=t.n_heads, n_kv_heads=t.n_kv_heads, vocab_size=t.vocab_size,
             norm_eps=t.norm_eps, rope_theta=t.rope_theta, use_qk_norm=t.use_qk_norm,
             attention_chunk_size=t.attention_chunk_size, nope_layer_interval=interval,
             attn_temperature_tuning=t.attn_temperature_tuning, floor_scale=t.floor_scale, attn_scale=t.attn_scale,
             use_scaled_rope=t.rope_scaling is not None)
    if t.head_dim != t.dim // t.n_heads:
        p["head_dim"] = t.head_dim
    if t.rope_scaling is not None:
        if (t.rope_scaling.low_freq_factor, t.rope_scaling.original_context) != (1.0, 8192):
            raise ConfigError("Meta's reference fixes low_freq_factor=1 and original context 8192")
        p.update(rope_scaling_factor=t.rope_scaling.factor, rope_high_freq_factor=t.rope_scaling.high_freq_factor)
    # Meta derives widths from multipliers: pick multiple_of=1 and solve for the multipliers.
    p["multiple_of"] = 1
    p["ffn_dim_multiplier"] = None
    base = int(2 * int(4 * t.dim) / 3)
    if t.ffn_dim != base:
        p["ffn_dim_multiplier"] = (t.ffn_dim + 0.5) / base
    if t.moe is not None:
        step = t.is_moe.index(True) + 1
        if every(t.n_layers, step) != t.is_moe:
            raise ConfigError("Meta's params.json can only express an MoE layer every k layers")
        mult = p["ffn_dim_multiplier"] or 1.0
        # expert = int(int(mult * int(2*ffn_exp*dim/3)) / 2): choose ffn_exp to land on expert_dim.
        p["ffn_exp"] = (2 * t.moe.expert_dim + 1) / mult * 3 / (2 * t.dim)
        p["moe_args"] = dict(num_experts=t.moe.num_experts, top_k=t.moe.top_k, interleave_moe_layer_step=step,
                             capacity_factor=1.0, auto_scale_F=True)
    dense, expert = meta_ffn_dims(t.dim, p.get("ffn_exp"), p["ffn_dim_multiplier"], 1)
    if dense != t.ffn_dim or (t.moe is not None and expert != t.moe.expert_dim):
        raise ConfigError(f"cannot express ffn_dim={t.ffn_dim} / expert_dim in Meta's params.json")
    if (v := cfg.vision) is not None:
        if not v.projector_input_dim == v.projector_output_dim == v.output_dim or v.rope_theta != 10000.0:
            raise ConfigError("Meta's vision_args need projector dims equal to output_dim and rope_theta 10000")
        p["vision_args"] = dict(image_size=dict(height=v.image_size, width=v.image_size),
                                patch_size=dict(height=v.patch_size, width=v.patch_size), dim=v.dim,
                                n_layers=v.n_layers, n_heads=v.n_heads, mlp_ratio=v.mlp_dim / v.dim,
                                output_dim=v.output_dim, pixel_shuffle_ratio=v.pixel_shuffle_ratio)
    return p


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json

# Fields of Llama4TextConfig we read; the rest below are known and carry nothing the model needs.
_HF_TEXT_IGNORED = {
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_attn_implementation_autoset",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "hidden_act", "for_llm_compressor",
    "attention_bias", "tie_word_embeddings", "layer_types", "_name_or_path", "cache_implementation",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "quantization_config",
}
_HF_TEXT_READ = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok", "moe_layers",
    "interleave_moe_layer_step", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "use_qk_norm",
    "no_rope_layers", "no_rope_layer_interval", "attention_chunk_size", "attn_temperature_tuning", "floor_scale",
    "attn_scale", "max_position_embeddings",
}


def _hf_rope(tc: dict, where: str) -> tuple[float, RopeScaling | None]:
    # transformers < 5 writes rope_theta + rope_scaling; >= 5 writes rope_parameters (theta inside).
    rp = tc.get("rope_parameters") or {}
    rs = tc.get("rope_scaling") or {}
    theta = rp.get("rope_theta", tc.get("rope_theta", 500_000.0))
    spec = {**rs, **rp}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type '{kind}' is not supported (Llama 4 uses 'llama3' or none)")
    try:
        return theta, RopeScaling(float(spec["factor"]), float(spec["low_freq_factor"]),
                                  float(spec["high_freq_factor"]), int(spec["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"{where}: llama3 rope scaling is missing field {e}") from None


def from_hf_config(cfg: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (Llama4ForConditionalGeneration or Llama4ForCausalLM)."""
    if "text_config" in cfg:
        tc, vc = cfg["text_config"], cfg.get("vision_config")
        where_t = where + " text_config"
    else:
        tc, vc, where_t = cfg, None, where
    if cfg.get("tie_word_embeddings") or tc.get("tie_word_embeddings"):
        raise ConfigError(f"{where}: tie_word_embeddings=true is not a Llama 4 layout (its output head is untied)")
    if tc.get("attention_bias"):
        raise ConfigError(f"{where_t}: attention_bias=true is not a Llama 4 layout")
    unknown = sorted(set(tc) - _HF_TEXT_READ - _HF_TEXT_IGNORED)
    if unknown:
        raise ConfigError(f"{where_t}: unknown field(s) {unknown}")
    n_layers = _require(tc, "num_hidden_layers", where_t)
    dim = _require(tc, "hidden_size", where_t)
    n_heads = _require(tc, "num_attention_heads", where_t)

    # no_rope_layers[i] == 1 means layer i USES RoPE (the name reads backwards). An empty list means
    # "derive from the interval", as in the released Scout config.
    nrl = tc.get("no_rope_layers") or None
    if nrl is not None:
        if len(nrl) < n_layers:
            raise ConfigError(f"{where_t}: no_rope_layers has {len(nrl)} entries for {n_layers} layers")
        uses_rope = tuple(bool(v) for v in nrl[:n_layers])
    else:
        uses_rope = rope_layout(n_layers, tc.get("no_rope_layer_interval", 4))
    if (lt := tc.get("layer_types")) is not None:
        expected = ["chunked_attention" if r else "full_attention" for r in uses_rope]
        if list(lt[:n_layers]) != expected:
            raise ConfigError(f"{where_t}: layer_types contradicts no_rope_layers")

    moe_layers = tc.get("moe_layers")
    if moe_layers is not None:
        if any(not 0 <= i < n_layers for i in moe_layers):
            raise ConfigError(f"{where_t}: moe_layers {moe_layers} names layers outside 0..{n_layers - 1}")
        is_moe = tuple(i in set(moe_layers) for i in range(n_layers))
    else:
        is_moe = every(n_layers, tc.get("interleave_moe_layer_step", 1))
    moe = None
    if any(is_moe):
        moe = MoEConfig(tc.get("num_local_experts", 16), tc.get("num_experts_per_tok", 1),
                        tc.get("intermediate_size", 8192))
    theta, scaling = _hf_rope(tc, where_t)
    text = TextConfig(
        vocab_size=tc.get("vocab_size", LLAMA4_VOCAB), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=tc.get("num_key_value_heads") or n_heads, head_dim=tc.get("head_dim") or dim // n_heads,
        ffn_dim=tc.get("intermediate_size_mlp", 16384), uses_rope=uses_rope, is_moe=is_moe, moe=moe,
        norm_eps=tc.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        use_qk_norm=tc.get("use_qk_norm", True),
        attention_chunk_size=tc.get("attention_chunk_size", 8192),
        attn_temperature_tuning=bool(tc.get("attn_temperature_tuning", True)),
        floor_scale=float(tc.get("floor_scale", 8192)), attn_scale=tc.get("attn_scale", 0.1),
        max_seq_len=tc.get("max_position_embeddings", 131072),
    )
    vision = None
    if vc:
        vision = VisionConfig(
            image_size=vc.get("image_size", 336), patch_size=vc.get("patch_size", 14),
            dim=vc.get("hidden_size", 1408), n_layers=vc.get("num_hidden_layers", 34),
            n_heads=vc.get("num_attention_heads", 16), mlp_dim=vc.get("intermediate_size", 5632),
            output_dim=vc.get("vision_output_dim", 4096), pixel_shuffle_ratio=vc.get("pixel_shuffle_ratio", 0.5),
            projector_input_dim=vc.get("projector_input_dim", 4096),
            projector_output_dim=vc.get("projector_output_dim", 4096),
            # transformers 5 keeps it under rope_parameters; the LayerNorms always use eps 1e-5 (both references).
            rope_theta=float(vc.get("rope_theta") or (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
    return ModelConfig(text=text, vision=vision, name="hf")


def to_hf_text_config(t: TextConfig, special_tokens: Mapping[str, int] | None = None) -> dict:
    """The ``text_config`` (or Llama4ForCausalLM config) dict transformers reads back to the same model.

    ``special_tokens``: the tokenizer's name -> id table, for bos / eos / pad ids; default: Llama 4's
    layout (`llama4_special_ids`).
    """
    d = dict(
        model_type="llama4_text", vocab_size=t.vocab_size, hidden_size=t.dim, num_hidden_layers=t.n_layers,
        num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads, head_dim=t.head_dim,
        intermediate_size=t.moe.expert_dim if t.moe else t.ffn_dim, intermediate_size_mlp=t.ffn_dim,
        num_local_experts=t.moe.num_experts if t.moe else 1, num_experts_per_tok=t.moe.top_k if t.moe else 1,
        moe_layers=[i for i, m in enumerate(t.is_moe) if m], no_rope_layers=[int(r) for r in t.uses_rope],
        rms_norm_eps=t.norm_eps, use_qk_norm=t.use_qk_norm, attention_chunk_size=t.attention_chunk_size,
        attn_temperature_tuning=t.attn_temperature_tuning, attn_scale=t.attn_scale,
        floor_scale=int(t.floor_scale) if float(t.floor_scale).is_integer() else t.floor_scale,
        max_position_embeddings=t.max_seq_len, rope_theta=t.rope_theta, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=False,
    )
    d |= hf_token_fields(special_tokens or llama4_special_ids(t.vocab_size))[0]
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling:
        s = t.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": t.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_context}
    # Both spellings: transformers 4.x reads rope_scaling, 5.x rope_parameters.
    d["rope_parameters"] = rope
    d["rope_scaling"] = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return d


def llama4_special_ids(vocab_size: int) -> dict[str, int]:
    """Special token name -> id in Llama 4's layout: its 2,048 special tokens, in Meta's order, are
    the last ids of the vocabulary (a tokenizer file, when there is one, is the authority)."""
    return {name: vocab_size - NUM_SPECIAL + i for i, name in enumerate(llama4_special_tokens())}


def hf_token_fields(special: Mapping[str, int]) -> tuple[dict, dict]:
    """The config.json token fields from a name -> id table: (text_config's bos / eos / pad ids,
    Llama4ForConditionalGeneration's image token indices)."""
    text = {"bos_token_id": special["<|begin_of_text|>"], "pad_token_id": special["<|finetune_right_pad|>"],
            "eos_token_id": [special["<|end_of_text|>"], special["<|eom|>"], special["<|eot|>"]]}
    image = {"boi_token_index": special["<|image_start|>"], "eoi_token_index": special["<|image_end|>"],
             "image_token_index": special["<|patch|>"]}
    return text, image


def to_hf_config(t: TextConfig, v: VisionConfig | None, special_tokens: Mapping[str, int] | None = None,
                 torch_dtype: str = "float32") -> dict:
    """A whole config.json: Llama4ForCausalLM without a vision config, else
    Llama4ForConditionalGeneration (text_config, vision_config, image token indices)."""
    special = special_tokens or llama4_special_ids(t.vocab_size)
    if v is None:
        return {**to_hf_text_config(t, special), "architectures": ["Llama4ForCausalLM"], "torch_dtype": torch_dtype}
    return {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": to_hf_text_config(t, special), "vision_config": to_hf_vision_config(v),
            **hf_token_fields(special)[1], "tie_word_embeddings": False, "torch_dtype": torch_dtype}


def to_hf_vision_config(v: VisionConfig) -> dict:
    """The ``vision_config`` dict of a Llama4ForConditionalGeneration config.json."""
    return dict(model_type="llama4_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                hidden_size=v.dim, num_hidden_layers=v.n_layers, num_attention_heads=v.n_heads,
                intermediate_size=v.mlp_dim, vision_output_dim=v.output_dim, pixel_shuffle_ratio=v.pixel_shuffle_ratio,
                projector_input_dim=v.projector_input_dim, projector_output_dim=v.projector_output_dim,
                rope_theta=v.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": v.rope_theta},
                num_channels=3, hidden_act="gelu", norm_eps=1e-5, vision_feature_layer=-1,
                vision_feature_select_strategy="default", multi_modal_projector_bias=False)


# ---------------------------------------------------------------------------------------------
# Presets. Sources: Meta's params.json / Hugging Face config.json of the released checkpoints
# (meta-llama/Llama-4-Scout-17B-16E, meta-llama/Llama-4-Maverick-17B-128E), SPEC.md §1.


def _llama4(n_layers: int, num_experts: int, moe_step: int, **kw) -> TextConfig:
    base = dict(
        vocab_size=LLAMA4_VOCAB, dim=5120, n_layers=n_layers, n_heads=40, n_kv_heads=8, head_dim=128,
        ffn_dim=16384, uses_rope=rope_layout(n_layers, 4), is_moe=every(n_layers, moe_step),
        moe=MoEConfig(num_experts=num_experts, top_k=1, expert_dim=8192),
    )
    return TextConfig(**{**base, **kw})


def _tiny(n_layers=4, moe_step=1, top_k=1, n_heads=4, n_kv_heads=2, **kw) -> TextConfig:
    """A few-hundred-KB model with the real vocabulary; chunk 8 so 4 chunks are 32 tokens."""
    base = dict(
        vocab_size=LLAMA4_VOCAB, dim=64, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=16,
        ffn_dim=128, uses_rope=rope_layout(n_layers, 4), is_moe=every(n_layers, moe_step),
        moe=MoEConfig(num_experts=4, top_k=top_k, expert_dim=64), attention_chunk_size=8, floor_scale=4.0,
        max_seq_len=4096,
    )
    return TextConfig(**{**base, **kw})


# 56-pixel tiles of 4×4 patches -> 4 vectors per tile after the shuffle; 2 layers of width 32.
TINY_VISION = VisionConfig(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2, mlp_dim=128, output_dim=64,
                           pixel_shuffle_ratio=0.5, projector_input_dim=64, projector_output_dim=64)

PRESETS: dict[str, ModelConfig] = {
    "scout": ModelConfig(
        text=_llama4(48, 16, 1, rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), max_seq_len=10_485_760),
        vision=VisionConfig(), name="scout", note="Llama-4-Scout-17B-16E: 16 experts, every layer MoE"),
    "maverick": ModelConfig(
        text=_llama4(48, 128, 2, use_qk_norm=False, max_seq_len=1_048_576),
        vision=VisionConfig(), name="maverick", note="Llama-4-Maverick-17B-128E: 128 experts, every 2nd layer MoE"),
    # Behemoth's shapes were never published. These are an ESTIMATE, searched to land on the announced
    # ~288B active / ~2T total (285.7B / 1.998T): width 16384, 84 layers, 128 heads of 128, 16 KV heads,
    # 16 experts of width 27648, every layer MoE.
    "behemoth": ModelConfig(
        text=TextConfig(
            vocab_size=LLAMA4_VOCAB, dim=16384, n_layers=84, n_heads=128, n_kv_heads=16, head_dim=128,
            ffn_dim=2 * 27648, uses_rope=rope_layout(84, 4), is_moe=every(84, 1),
            moe=MoEConfig(num_experts=16, top_k=1, expert_dim=27648), max_seq_len=1_048_576),
        vision=VisionConfig(), name="behemoth",
        note="ESTIMATE: Behemoth's dimensions are unpublished; for planning and meta-device use only"),
    "tiny-moe": ModelConfig(text=_tiny(), vision=TINY_VISION, name="tiny-moe",
                            note="tiny random test model, every layer MoE, tiny vision encoder"),
    "tiny-interleaved": ModelConfig(text=_tiny(moe_step=2, top_k=2), vision=TINY_VISION, name="tiny-interleaved",
                                    note="tiny random test model, MoE every 2nd layer, top-2, tiny vision encoder"),
    "tiny-dense": ModelConfig(text=_tiny(is_moe=(False,) * 4, moe=None), name="tiny-dense",
                              note="tiny random test model, no MoE"),
}


def preset(name: str) -> ModelConfig:
    """A named preset; raises ConfigError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}") from None


__all__ = [
    "ConfigError", "RopeScaling", "MoEConfig", "VisionConfig", "TextConfig", "ModelConfig", "PRESETS", "preset",
    "from_hf_config", "to_hf_config", "to_hf_text_config", "llama4_special_ids", "hf_token_fields", "to_hf_vision_config", "from_meta_params", "to_meta_params", "meta_ffn_dims", "every",
    "rope_layout",
]
