"""Meta's checkpoint format (``params.json`` + ``consolidated.NN.pth``) <-> herd state dicts.

herd's parameter names are those of Meta's reference modules, so an unfused Meta checkpoint is
mostly a rename-free copy. The released checkpoints use the fused names that Meta's load hooks
(llama_models/llama4/{model,moe,ffn}.py) accept; every one of them is read here:

    attention.wqkv.weight                [(H + 2 KV) hd, D]  -> attention.wq / wk / wv
    attention.wqkv.layer_norm_weight                         -> attention_norm.weight
    feed_forward.norm.weight (MoE) / feed_forward.mlp.layer_norm_weight (dense) -> ffn_norm.weight
    feed_forward.mlp.fc1_weight          [2F, D] (w1 then w3) -> feed_forward.w1 / w3
    feed_forward.mlp.fc2_weight          [D, F]              -> feed_forward.w2
    feed_forward.router_DE               [D, E]              -> feed_forward.router.weight [E, D]
    feed_forward.experts.moe_w_in_eD_F   [E D, F]            -> feed_forward.experts.w1 [E, F, D]
    feed_forward.experts.moe_w_swiglu_eD_F [E D, F]          -> feed_forward.experts.w3 [E, F, D]
    feed_forward.experts.moe_w_out_eF_D  [E F, D]            -> feed_forward.experts.w2 [E, D, F]
    (unfused Meta experts.w1/w3 [E, D, F] and w2 [E, F, D] are transposed the same way)
    feed_forward.w_in_shared_FD / w_swiglu_FD / w_out_shared_DF -> feed_forward.shared_expert.w1 / w3 / w2

``rope.freqs``, ``*._extra_state`` and the router's training statistics (``*_gate_stats_3E``,
``expert_activation_DE``) carry nothing the forward pass uses and are skipped, as Meta's loader does.

A checkpoint saved with model parallelism N has N shards, each holding a slice of every
parallel weight; :class:`MetaShards` joins the slices per tensor, on access, along the axis each
weight was split (``llama_models/checkpoint.py`` is the ground truth for those axes), or, for a
tensor-parallel rank that needs only a view of the joined tensor, cuts each slice to that view first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.hf import Recipe
from herd.config import TextConfig, VisionConfig

_VISION_PREFIXES = ("vision_embeddings.", "vision_projection.")
_SKIPPED = re.compile(r"(^|\.)rope\.freqs$|\._extra_state$|\.feed_forward\.(global_gate_stats_3E|running_gate_stats_3E"
                      r"|expert_activation_DE)$")


def is_vision_key(key: str) -> bool:
    """Whether a Meta checkpoint key belongs to the vision encoder or its projection."""
    return key.startswith(_VISION_PREFIXES)


def skipped(key: str) -> bool:
    """Keys the text model does not read: vision weights, rope.freqs, extra state, router statistics."""
    return is_vision_key(key) or bool(_SKIPPED.search(key))


# ---------------------------------------------------------------------------------------------
# Meta keys -> herd keys


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _rows(start: int, stop: int):
    return lambda t: t[start:stop]


def _experts(n: int, dim: int, last: bool):
    """[E*D, F] -> herd's [E, F, D] (last=True), or [E*F, D] -> [E, D, F]; merged shards are already 3-D."""
    if last:
        return lambda t: t.reshape(n, dim, -1).transpose(1, 2)
    return lambda t: t.reshape(n, -1, dim).transpose(1, 2)


def _swap(t: torch.Tensor) -> torch.Tensor:
    """Meta's x @ W expert layout [E, a, b] <-> herd's (out, in) [E, b, a]."""
    return t.transpose(1, 2)


def _first(keys: set[str], *candidates: str) -> str:
    """The first candidate present in the checkpoint (the last one is named in errors if none is)."""
    for c in candidates:
        if c in keys:
            return c
    return candidates[-1]


def meta_plan(cfg: TextConfig, keys: set[str]) -> dict[str, Recipe]:
    """herd key -> Recipe over a Meta checkpoint's keys, whichever fused or unfused names it uses."""
    hd = cfg.head_dim
    plan = {k: Recipe((k,)) for k in ("tok_embeddings.weight", "norm.weight", "output.weight")}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if p + "attention.wqkv.weight" in keys:
            q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
            for name, (a, b) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                plan[f"{p}attention.w{name}.weight"] = Recipe((p + "attention.wqkv.weight",), _rows(a, b))
        else:
            for name in "qkv":
                plan[f"{p}attention.w{name}.weight"] = Recipe((f"{p}attention.w{name}.weight",))
        plan[p + "attention.wo.weight"] = Recipe((p + "attention.wo.weight",))
        plan[p + "attention_norm.weight"] = Recipe((_first(keys, p + "attention.wqkv.layer_norm_weight",
                                                           p + "attention_norm.weight"),))
        plan[p + "ffn_norm.weight"] = Recipe((_first(keys, p + "feed_forward.mlp.layer_norm_weight",
                                                     p + "feed_forward.norm.weight", p + "ffn_norm.weight"),))
        f = p + "feed_forward."
        if not cfg.is_moe[i]:
            if f + "mlp.fc1_weight" in keys:
                plan[f + "w1.weight"] = Recipe((f + "mlp.fc1_weight",), lambda t: t.chunk(2, dim=0)[0])
                plan[f + "w3.weight"] = Recipe((f + "mlp.fc1_weight",), lambda t: t.chunk(2, dim=0)[1])
                plan[f + "w2.weight"] = Recipe((f + "mlp.fc2_weight",))
            else:
                for w in ("w1", "w2", "w3"):
                    plan[f"{f}{w}.weight"] = Recipe((f"{f}{w}.weight",))
            continue
        plan[f + "router.weight"] = Recipe((f + "router_DE",), _transpose)
        n, dim = cfg.moe.num_experts, cfg.dim
        if f + "experts.moe_w_in_eD_F" in keys:
            plan[f + "experts.w1"] = Recipe((f + "experts.moe_w_in_eD_F",), _experts(n, dim, last=True))
            plan[f + "experts.w3"] = Recipe((f + "experts.moe_w_swiglu_eD_F",), _experts(n, dim, last=True))
            plan[f + "experts.w2"] = Recipe((f + "experts.moe_w_out_eF_D",), _experts(n, dim, last=False))
        else:
            for w in ("w1", "w2", "w3"):
                plan[f"{f}experts.{w}"] = Recipe((f"{f}experts.{w}",), _swap)
        fused_shared = {"w1": "w_in_shared_FD", "w3": "w_swiglu_FD", "w2": "w_out_shared_DF"}
        for w, fused in fused_shared.items():
            plan[f"{f}shared_expert.{w}.weight"] = Recipe((_first(keys, f"{f}{fused}.weight",
                                                                  f"{f}shared_expert.{w}.weight"),))
    return plan


def from_meta(sd: Mapping[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """herd state dict from a (merged) Meta one."""
    plan = meta_plan(cfg, set(sd.keys()))
    return {k: r.combine(*(sd[s] for s in r.sources)) for k, r in plan.items()}


# ---------------------------------------------------------------------------------------------
# Model-parallel shards

# How each parallel weight was split across model-parallel ranks (dim of the slices), by key suffix.
_SPLIT_DIM = [
    (re.compile(r"(attention\.wo\.weight|feed_forward\.(w2\.weight|mlp\.fc2_weight|w_out_shared_DF\.weight"
                r"|shared_expert\.w2\.weight)|attn\.wo\.weight|mlp\.c_proj\.weight)$"), 1),  # row-parallel
    (re.compile(r"(attention\.w[qkv]\.weight|feed_forward\.(w[13]\.weight|w_in_shared_FD\.weight|w_swiglu_FD\.weight"
                r"|shared_expert\.w[13]\.weight)|^output\.weight|^tok_embeddings\.weight"
                r"|attn\.w[qkv]\.(weight|bias)|mlp\.c_fc\.(weight|bias)|conv1\._linear\.weight"
                r"|^vision_projection\.weight)$"), 0),  # column-parallel: output features split
    (re.compile(r"feed_forward\.experts\.w[13]$"), 2),  # [E, D, F/N]
    (re.compile(r"feed_forward\.experts\.w2$"), 1),  # [E, F/N, D]
]


class MetaShards(Mapping):
    """N model-parallel shard dicts seen as one merged state dict; each tensor is joined when read."""

    def __init__(self, shards: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None,
                 release: Callable[[torch.Tensor], None] | None = None):
        if not shards:
            raise CheckpointError("no Meta checkpoint shards given")
        names = list(names) if names is not None else [f"shard {i}" for i in range(len(shards))]
        self._shards, self._names = list(shards), names
        self._release = release  # called on each slice once it has been joined (drops mapped pages)
        keys = list(shards[0].keys())
        for name, s in zip(names[1:], shards[1:]):
            if set(s.keys()) != set(keys):
                odd = sorted(set(s.keys()) ^ set(keys))[0]
                raise CheckpointError(f"{name}: its tensors differ from {names[0]}'s (first difference: '{odd}'); "
                                      f"model-parallel shards must hold the same names")
        self._keys = keys

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = [s[key] for s in self._shards]
        if len(parts) == 1:
            return parts[0]
        layout = self._layout(key, parts)
        if layout is None:
            return parts[0]  # replicated: norms, router, statistics
        pieces, dim, shape = layout
        try:
            joined = torch.cat(pieces, dim=dim).reshape(shape)
        except RuntimeError as e:  # slices whose shapes do not fit together
            raise CheckpointError(f"{self._names[0]}..{self._names[-1]}: cannot join the {len(parts)} "
                                  f"model-parallel slices of '{key}' ({e})") from None
        self._let_go(parts)
        return joined

    def read_view(self, key: str, view: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(``view(self[key])``, bytes read) reading only the slices' bytes the view covers, for a ``view``
        made of view ops (slicing, narrow, transpose, splitting reshapes): the view is traced on a meta
        tensor of the joined shape, the box of joined indices it covers is cut out of each slice, and
        the view is laid over that box. A view that is not such a box reads the joined tensor."""
        parts = [s[key] for s in self._shards]
        layout = self._layout(key, parts) if len(parts) > 1 else None
        if layout is None:  # one shard, or a replicated tensor
            value = view(parts[0])
            if value.untyped_storage().data_ptr() != parts[0].untyped_storage().data_ptr():
                return value, parts[0].numel() * parts[0].element_size()  # the view made a copy: read whole
            return value, value.numel() * value.element_size()  # a view of the file: copied part only
        pieces, dim, shape = layout
        cat_shape = list(pieces[0].shape)
        cat_shape[dim] = sum(p.shape[dim] for p in pieces)
        box = _box(cat_shape, lambda u: view(u.reshape(shape)))
        if box is None:
            value = view(self[key])
            return value, sum(p.numel() * p.element_size() for p in parts)
        lo, hi, size, walks = box
        cut, at = [], 0
        for p in pieces:  # the pieces lie side by side along dim: keep those inside the box, cut to it
            a, b = max(lo[dim], at), min(hi[dim], at + p.shape[dim])
            if a < b:
                cut.append(_narrow_box(p, lo, hi, dim, a - at, b - a))
            at += p.shape[dim]
        block = torch.cat(cut, dim=dim)  # the box, in this process's memory
        self._let_go(parts)
        value = block.as_strided(size, [step * block.stride(d) for d, step in walks], 0)
        return value, block.numel() * block.element_size()

    def _let_go(self, parts: list[torch.Tensor]) -> None:
        if self._release is not None:
            for part in parts:
                self._release(part)

    def _layout(self, key: str, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], int, tuple] | None:
        """How the slices join, or None for a replicated tensor: (pieces, dim, shape): the pieces side by
        side along ``dim``, reshaped to ``shape``, are the joined tensor."""
        if key.endswith("attention.wqkv.weight"):
            # Each slice is [q_n; k_n; v_n]; q_n's height is the width of the same shard's wo slice.
            wo = key.replace("wqkv", "wo")
            split = []
            for s, t in zip(self._shards, parts):
                q = s[wo].shape[1]
                kv = (t.shape[0] - q) // 2
                split.append(t.split((q, kv, kv)))
            pieces = [piece for group in zip(*split) for piece in group]  # all q, then all k, then all v
            return pieces, 0, (sum(p.shape[0] for p in pieces), parts[0].shape[1])
        if key.endswith("feed_forward.mlp.fc1_weight"):  # each slice is [w1_n; w3_n]
            pieces = [t.unflatten(0, (2, -1)) for t in parts]
            return pieces, 1, (2 * sum(p.shape[1] for p in pieces), parts[0].shape[1])
        if key.endswith(("experts.moe_w_in_eD_F", "experts.moe_w_swiglu_eD_F", "experts.moe_w_out_eF_D")):
            n = self._num_experts(key)
            pieces = [t.unflatten(0, (n, -1)) for t in parts]
            dim = 1 if key.endswith("moe_w_out_eF_D") else 2  # [E*F/N, D] -> [E, F, D]; [E*D, F/N] -> [E, D, F]
            shape = list(pieces[0].shape)
            shape[dim] = sum(p.shape[dim] for p in pieces)
            return pieces, dim, tuple(shape)
        for pattern, dim in _SPLIT_DIM:
            if pattern.search(key):
                shape = list(parts[0].shape)
                shape[dim] = sum(p.shape[dim] for p in parts)
                return parts, dim, tuple(shape)
        return None

    def _num_experts(self, key: str) -> int:
        router = key.rsplit("experts.", 1)[0] + "router_DE"
        if router not in self._shards[0]:
            raise CheckpointError(f"{self._names[0]}: '{key}' without '{router}', so its expert count is unknown")
        return self._shards[0][router].shape[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _box(shape: list[int], view: Callable[[torch.Tensor], torch.Tensor]):
    """Which indices of a contiguous tensor of ``shape`` the view ops ``view`` cover, as a box:
    (lo, hi, size, [(dim, step)]): per dim the half-open range [lo, hi); the view's sizes; and for each
    of its dims the tensor dim it walks and the step. None when the view is not such a box."""
    m = torch.empty(shape, device="meta")
    v = view(m)
    if v is not m and v._base is not m:
        return None  # not a view (a copy was made)
    strides, offset = m.stride(), v.storage_offset()
    lo = [(offset // st) % n for st, n in zip(strides, shape)]
    hi = [c + 1 for c in lo]
    walks, used = [], set()
    for n, st in zip(v.shape, v.stride()):
        if n == 1:
            walks.append((0, 0))
            continue
        d = next((d for d in range(len(shape)) if st > 0 and st % strides[d] == 0
                  and (d == 0 or st < strides[d - 1])), None)
        if d is None or d in used or lo[d] + (n - 1) * (st // strides[d]) >= shape[d]:
            return None
        used.add(d)
        hi[d] = lo[d] + (n - 1) * (st // strides[d]) + 1
        walks.append((d, st // strides[d]))
    return lo, hi, list(v.shape), walks


def _narrow_box(piece: torch.Tensor, lo: list[int], hi: list[int], dim: int, start: int, length: int) -> torch.Tensor:
    """``piece`` cut to the box, along ``dim`` from ``start`` (the piece's own index) for ``length``."""
    for d in range(piece.dim()):
        piece = piece.narrow(d, start, length) if d == dim else piece.narrow(d, lo[d], hi[d] - lo[d])
    return piece


# ---------------------------------------------------------------------------------------------
# Meta's FP8 release: routed experts in float8 with a scale per (expert, output feature)

_FP8_SCALE_KEYS = {"moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3", "moe_w_out_eF_D": "w2"}


class Fp8Shard(Mapping):
    """One shard of Meta's FP8 checkpoints (llama_models/llama4/scripts/quantize.py, ``fp8_mixed``):
    the routed experts' ``moe_w_*`` slices are float8_e4m3fn, their row-wise scales [E, out] sit in
    ``fp8_scales_N.pt`` under herd's names (``layers.i.feed_forward.experts.w1``). Reads them dequantized
    to ``dtype``, slice by slice: each rank quantized its own slice, so scales apply before the join."""

    def __init__(self, shard: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 where: str, scales_where: str, release: Callable[[torch.Tensor], None] = lambda t: None):
        self._shard, self._scales, self._dtype, self._release = shard, scales, dtype, release
        for key, t in shard.items():
            if t.dtype != torch.float8_e4m3fn:
                continue
            head, _, leaf = key.rpartition(".")
            if leaf not in _FP8_SCALE_KEYS:
                raise CheckpointError(f"{where}: tensor '{key}' is float8 but only the routed experts' moe_w_* are "
                                      "in Meta's FP8 release")
            scale_key = f"{head}.{_FP8_SCALE_KEYS[leaf]}"
            if scale_key not in scales:
                raise CheckpointError(f"{scales_where}: missing scale '{scale_key}' for float8 tensor '{key}'")
            scale = scales[scale_key]
            last = t.shape[-1]
            if scale.dim() != 2 or scale.shape[1] != last or t.shape[0] % scale.shape[0]:
                raise CheckpointError(f"{scales_where}: scale '{scale_key}' has shape {tuple(scale.shape)}; "
                                      f"'{key}' {tuple(t.shape)} needs [experts, {last}]")

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._shard[key]
        if t.dtype != torch.float8_e4m3fn:
            return t
        head, _, leaf = key.rpartition(".")
        scale = self._scales[f"{head}.{_FP8_SCALE_KEYS[leaf]}"]
        E = scale.shape[0]
        if t.device.type == "meta":
            return torch.empty(t.shape, dtype=self._dtype, device="meta")
        out = torch.empty(E, t.shape[0] // E, t.shape[1], dtype=self._dtype)
        for e, block in enumerate(t.view(E, -1, t.shape[1])):  # one expert's float32 at a time
            out[e] = block.float() * scale[e].float()
        self._release(t)
        return out.view(t.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard)

    def __len__(self) -> int:
        return len(self._shard)


# ---------------------------------------------------------------------------------------------
# herd -> Meta (for tests, benchmarks and users who feed Meta's own tools)


def to_meta(sd: Mapping[str, torch.Tensor], cfg: TextConfig, *, fused: bool = False,
            mp: int = 1) -> list[dict[str, torch.Tensor]]:
    """Meta-format shard dicts: unfused names (Meta's module names) or the fused release names, over mp ranks."""
    if cfg.n_kv_heads % mp or cfg.n_heads % mp:
        raise ValueError(f"model parallelism {mp} must divide n_heads {cfg.n_heads} and n_kv_heads {cfg.n_kv_heads}")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]

    def put(key: str, t: torch.Tensor, dim: int | None) -> None:
        pieces = [t] * mp if dim is None else t.chunk(mp, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone(memory_format=torch.contiguous_format)

    put("tok_embeddings.weight", sd["tok_embeddings.weight"], 0)
    put("norm.weight", sd["norm.weight"], None)
    put("output.weight", sd["output.weight"], 0)
    for i in range(cfg.n_layers):
        p, f = f"layers.{i}.", f"layers.{i}.feed_forward."
        a = p + "attention."
        put(a + "wo.weight", sd[a + "wo.weight"], 1)
        if fused:
            qkv = [sd[f"{a}w{n}.weight"].chunk(mp, dim=0) for n in "qkv"]
            for shard, (q, k, v) in zip(shards, zip(*qkv)):
                shard[a + "wqkv.weight"] = torch.cat([q, k, v]).clone()
            put(a + "wqkv.layer_norm_weight", sd[p + "attention_norm.weight"], None)
            norm = f + ("norm.weight" if cfg.is_moe[i] else "mlp.layer_norm_weight")
            put(norm, sd[p + "ffn_norm.weight"], None)
        else:
            for n in "qkv":
                put(f"{a}w{n}.weight", sd[f"{a}w{n}.weight"], 0)
            put(p + "attention_norm.weight", sd[p + "attention_norm.weight"], None)
            put(p + "ffn_norm.weight", sd[p + "ffn_norm.weight"], None)
        if not cfg.is_moe[i]:
            if fused:
                w1, w3 = sd[f + "w1.weight"].chunk(mp, dim=0), sd[f + "w3.weight"].chunk(mp, dim=0)
                for shard, x1, x3 in zip(shards, w1, w3):
                    shard[f + "mlp.fc1_weight"] = torch.cat([x1, x3]).clone()
                put(f + "mlp.fc2_weight", sd[f + "w2.weight"], 1)
            else:
                for w, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
                    put(f"{f}{w}.weight", sd[f"{f}{w}.weight"], dim)
            continue
        put(f + "router_DE", sd[f + "router.weight"].t().contiguous(), None)
        e = f + "experts."
        w1, w3, w2 = (_swap(sd[e + w]) for w in ("w1", "w3", "w2"))  # to Meta's [E, D, F], [E, F, D]
        if fused:
            put(e + "moe_w_in_eD_F", w1, 2)
            put(e + "moe_w_swiglu_eD_F", w3, 2)
            put(e + "moe_w_out_eF_D", w2, 1)
            for shard in shards:  # each slice flattened as Meta stores it
                for k in ("moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D"):
                    shard[e + k] = shard[e + k].flatten(0, 1)
        else:
            for w, t, dim in (("w1", w1, 2), ("w3", w3, 2), ("w2", w2, 1)):
                put(e + w, t, dim)
        for w, fused_name, dim in (("w1", "w_in_shared_FD", 0), ("w3", "w_swiglu_FD", 0), ("w2", "w_out_shared_DF", 1)):
            name = f"{f}{fused_name}.weight" if fused else f"{f}shared_expert.{w}.weight"
            put(name, sd[f"{f}shared_expert.{w}.weight"], dim)
    return shards


# ---------------------------------------------------------------------------------------------
# Vision encoder, adapter and projection


def meta_vision_plan(v: VisionConfig) -> dict[str, Recipe]:
    """``vision.*`` herd key -> Recipe over Meta's keys (vision_embeddings.*, vision_projection.weight)."""
    enc, adapter = "vision_embeddings.vision_encoder.", "vision_embeddings.vision_adapter.mlp."
    pairs = [("patch_embed.weight", enc + "conv1._linear.weight"), ("class_token", enc + "class_embedding"),
             ("pos_embed", enc + "positional_embedding_vlm"), ("adapter_fc1.weight", adapter + "c_fc.weight"),
             ("adapter_fc2.weight", adapter + "c_proj.weight"), ("projector.weight", "vision_projection.weight")]
    pairs += [(f"{a}.{p}", f"{enc}{b}.{p}") for a, b in (("norm_pre", "ln_pre"), ("norm_post", "ln_post"))
              for p in ("weight", "bias")]
    layer = [("norm1", "ln_1"), ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")] + [
        (f"attn.w{x}", f"attn.w{x}") for x in "qkvo"]
    for i in range(v.n_layers):
        pairs += [(f"layers.{i}.{a}.{p}", f"{enc}transformer.resblocks.{i}.{b}.{p}") for a, b in layer
                  for p in ("weight", "bias")]
    return {"vision." + ours: Recipe((theirs,)) for ours, theirs in pairs}
