"""The lookup probe: does in-context copying form in a herd-tiny-shaped decoder, within one attention
chunk and beyond it, and do fact lookups follow? Minutes per question instead of an hour-long build,
to choose herd-tiny's architecture and text curriculum (`python -m experiments.herd_tiny probe --help`).

A decoder (herd's TextModel of herd-tiny's kind, `build.text_config`; herd's pretraining init and
weight-decay groups) trains from scratch on packed rows of generated documents:

  lists   "Words: w1 ... wn. Again: w1 ... wn." (`text.word_list`); loss on ". Again:", the repetition
          and the final "." (the first listing cannot be predicted); scored on the repetition.
  facts   a `text.retrieval_example` body, its question and the answer's words; scored on the number.
  pairs   fact lists: "The number of the fox is 42. ..." (2-6 facts), stories, " Again:" and the same
          facts (in the same order or shuffled); learned from " Again:" on, scored on the numbers.
  pictures  (with ``encoder``, a frozen pretrained vision encoder) a chat about a picture of the
          spec's distribution, as herd train reads one; learned and scored on the answers. ``image_first``
          steps of them alone open the run; they are ``images`` of the documents once nmax >= ``images_at``.

Curriculum: lists of nmin..nmax words; with ``grow``, whenever the lists at the top of that range
are copied with accuracy >= ``switch``, nmax rises by ``grow`` (so more and more of each repetition
lies beyond the chunked RoPE layers' reach and only the global NoPE layers can copy it); facts and
fact lists join once nmax reaches ``facts_at``, the stories inside fact lists growing by ``pair_grow``
tokens whenever the longest are answered >= ``switch``. Every ``every`` steps it prints
teacher-forced accuracy on fresh documents: picture chats answered exactly (with pictures), near lists (8-25 words: one chunk holds both listings),
straddling lists (the repetition starts in the chunk after the first listing: only NoPE layers reach
it), far lists (72-160 words), fact lists 0-30 and 4-5 chunks of stories apart, and exact fact answers
with the fact 0-60 and 256-384 tokens before the question. ``save`` writes the decoder (the start of
a `herd train` recipe's `model.text_init`); ``stop_at`` ends the run once far facts are answered so.

What it found (2026-12-03, width 256, 8 x 256 tokens a step, one seed each unless said): with NoPE
only at layer 3 of 4 the RoPE layers take the copying and the NoPE layer never learns it (straddling
lists 0.10-0.16); with NoPE at layers 1 and 3 (--nope-every 2, MoE or dense) near lists form an
induction head in ~400 steps and lists growing +16 words at 0.6 reach far lists (72-160 words) at
0.9 within ~1,000 steps (seed 1; seeds 0 and 2 stall at 41 words). Facts joining before that stall the
growth; fact lookups alone, after it, stay at 0-5% for 1,300 steps; fact lists in the same order
(30%, with 10% facts) bring far facts (4-6 chunks back) to ~0.7 (0.54-0.88) within 2,000-3,000
steps (README, herd-tiny). Straddling lists alone teach nothing.

Pictures and lookups compete (seed 1, the encoder of `python -m experiments.herd_tiny encoder`, frozen): 300
steps of pictures first, then 25% of the documents, and the lists' induction never forms (near lists
0.29 at step 1,850, against 0.76 at step 300 without pictures) while the pictures fall back from
0.2-0.5 to 0.08 exact; pictures joining at 41 words (25%) left the lists and facts as without them
in one run (far facts 0.50-0.75 over steps 2,850-3,300, 0.67 at the end; rerun with an encoder
trained again, the lists stalled at 41 words) but were never learned (exact chats 0.09 on average
after step 500, at most 0.25; 50% of the documents: 0.04-0.12 over 300 steps). A likely reason: a
picture's 64 tokens fill a whole attention chunk of 64, so from its answers only the NoPE layers
see the picture, the same layers the long lookups need.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch

from herd.bundled import MODELS_DIR
from herd.tokenizer.chat_format import ChatTokenizer
from herd.images import ImageTiler
from herd.model.transformer import TextModel
from herd.train.loss import IGNORE_INDEX, summed_loss
from experiments.herd_tiny import shapes, text
from herd.tokenizer.tokenizer import Tokenizer

DEFAULT_TOKENIZER = MODELS_DIR / "herd-tiny" / "tokenizer.json"


def _opt(default, help: str):
    """A ProbeConfig field and its `--help` line."""
    return field(default=default, metadata={"help": help})


@dataclass
class ProbeConfig:
    layers: int = _opt(4, "decoder layers")
    nope_every: int = _opt(2, "every Nth layer is NoPE (Llama 4: 4)")
    moe_every: int = _opt(2, "every Nth layer is MoE (0: dense everywhere)")
    dim: int = _opt(256, "width")
    heads: int = _opt(4, "attention heads (half as many key/value heads)")
    chunk: int = _opt(64, "attention chunk of the RoPE layers")
    qk_norm: bool = _opt(False, "QK-norm on the RoPE layers")
    lr: float = _opt(2e-3, "learning rate after the warm-up (constant)")
    warmup: int = _opt(50, "warm-up steps")
    steps: int = _opt(1000, "training steps")
    every: int = _opt(50, "measure (and grow the curriculum) every this many steps")
    rows: int = _opt(8, "rows a step (long documents: half as many of twice the length)")
    seq_len: int = _opt(256, "tokens a row")
    nmin: int = _opt(8, "fewest words a list")
    nmax: int = _opt(25, "most words a list at the start")
    grow: int = _opt(0, "raise nmax by this many words whenever the longest lists are copied >= switch (0: never)")
    switch: float = _opt(0.7, "accuracy that grows the lists (and the fact lists' stories)")
    far_nmax: int = _opt(160, "most words a list ever")
    straddle: float = _opt(0.0, "share of lists that straddle a chunk boundary")
    facts: float = _opt(0.3, "share of fact lookups once nmax >= facts_at")
    facts_at: int = _opt(100, "list length at which facts and fact lists join")
    max_distance: int = _opt(400, "most tokens between a fact and its question (and of the fact lists' stories)")
    pairs: float = _opt(0.0, "share of fact lists once nmax >= facts_at")
    pairs_shuffle: bool = _opt(True, "repeat the fact lists' facts in another order (0: in the same order)")
    pairs_bare: bool = _opt(False, "fact lists as 'Pairs: fox 42 cat 17 ...' (the number two tokens after its animal)")
    pair_grow: int = _opt(0, "grow the fact lists' stories by this many tokens whenever the longest are answered >= switch")
    seed: int = _opt(0, "seed of the weights and the training documents")
    stop_at: float = _opt(0.0, "stop once far facts (exact answers 4-6 chunks back) are measured >= this (0: never)")
    save: str = _opt("", "write the decoder here at the end (.safetensors; steps and curriculum state in its metadata)")
    init: str = _opt("", "start from a decoder --save wrote, and from its curriculum state (nmax, dmax)")
    encoder: str = _opt("", "a vision encoder (.safetensors, `python -m experiments.herd_tiny encoder`), frozen; needed for images")
    images: float = _opt(0.0, "share of chats about a picture among the training documents")
    images_at: int = _opt(0, "list length (nmax) at which picture chats join (0: from the start)")
    image_first: int = _opt(0, "steps of picture chats only at the start (half of them one large shape)")

    def __post_init__(self):
        rules = [("nmin", 1 <= self.nmin <= self.nmax <= self.far_nmax, "must be 1 <= nmin <= nmax <= far_nmax"),
                 ("steps", self.steps >= 0, "must be >= 0"), ("every", self.every >= 1, "must be >= 1"),
                 ("warmup", self.warmup >= 1, "must be >= 1"), ("grow", self.grow >= 0, "must be >= 0"),
                 ("rows", self.rows >= 2, "must be >= 2 (long documents take half as many)")]
        rules += [("pair_grow", self.pair_grow >= 0, "must be >= 0"),
                  ("save", not self.save or self.save.endswith(".safetensors"), "must name a .safetensors file"),
                  ("image_first", self.image_first >= 0, "must be >= 0"), ("images_at", self.images_at >= 0, "must be >= 0"),
                  ("encoder", bool(self.encoder) or not (self.images or self.image_first),
                   "pictures (images, image_first) need the encoder")]
        rules += [(name, 0 <= getattr(self, name) <= 1, "must be in [0, 1]")
                  for name in ("switch", "straddle", "facts", "pairs", "stop_at", "images")]
        bad = [f"{name} = {getattr(self, name)} ({why})" for name, ok, why in rules if not ok]
        if bad:
            raise ValueError("probe: " + "; ".join(bad))


class Doc(NamedTuple):
    ids: list[int]
    learn: list[bool]  # per token: learned (as a target)
    scored: list[bool]  # per token: counted by `accuracy` (as a target)
    pixels: torch.Tensor | None = None  # a picture chat's tiles


class Documents:
    """The probe's documents, tokenised with herd-tiny's tokenizer (pictures tiled for ``vision``,
    a VisionConfig, when given)."""

    def __init__(self, tok: Tokenizer, chunk: int, vision=None):
        from experiments.herd_tiny.build import MAX_TILES
        from experiments.herd_tiny.evaluate import vocabulary
        self.chunk = chunk
        # herd-tiny's tiling (one tile)
        self.tok = ChatTokenizer.of(tok, ImageTiler(vision, MAX_TILES) if vision is not None else None)
        self.words = sorted(vocabulary(random.Random(0)))
        self.patch_id = tok.token_id("<|patch|>")

    def count(self, s: str) -> int:
        return len(self.tok.encode(s))

    def word_list(self, rng: random.Random, n: int, straddle: bool = False) -> Doc:
        """A list of ``n`` words and its repetition; ``straddle``: story tokens before the list put
        the repetition's first piece (". Again:") at the start of the next chunk."""
        pieces = text.word_list(rng, self.words, n)
        parts = [self.tok.encode(pieces[0], bos=True)] + [self.tok.encode(p) for p in pieces[1:]]
        if straddle:
            room = self.chunk - len(parts[0]) - len(parts[1])
            if room < 0:
                raise ValueError(f"a list of {n} words does not fit in one chunk of {self.chunk}")
            parts[0] = parts[0][:1] + self.stories(rng, room) + parts[0][1:]
        ids = [t for p in parts for t in p]
        head = len(parts[0]) + len(parts[1])
        rep = head + len(parts[2])
        learn = [i >= head for i in range(len(ids))]
        scored = [rep <= i < rep + len(parts[3]) for i in range(len(ids))]
        return Doc(ids, learn, scored)

    def stories(self, rng: random.Random, n: int) -> list[int]:
        """``n`` tokens of story text (cut mid-sentence)."""
        ids: list[int] = []
        while len(ids) < n:
            ids += self.tok.encode(" " + text.story(rng))
        return ids[:n]

    def pairs(self, rng: random.Random, n: int, distance: int, shuffle: bool = True, bare: bool = False) -> Doc:
        """``n`` facts ("The number of the fox is 42."; ``bare``: "Pairs: fox 42 cat 17 ..."),
        ``distance`` tokens of stories, " Again:" and the same facts in another order (``shuffle``) or
        in the same order: each number is found where the same animal stood three tokens before a
        number (' fox', ' is', ' ', '42'; two tokens when bare), the lookup a fact question needs, once
        per fact. Learned from " Again:" on; scored on the repeated numbers."""
        keys = rng.sample(text.KEYS, n)
        values = [rng.randint(10, 99) for _ in keys]
        say = (lambda k, v: f" {k} {v}") if bare else (lambda k, v: " " + text.fact(k, v))
        listed = "".join(say(k, v) for k, v in zip(keys, values))
        ids = self.tok.encode("Pairs:" + listed if bare else listed.lstrip(), bos=True) + self.stories(rng, distance)
        head = len(ids)
        ids += self.tok.encode(" Again:")
        scored = [False] * len(ids)
        tail = 0 if bare else 1  # the fact's final "."
        for i in rng.sample(range(n), n) if shuffle else range(n):
            piece, digits = self.tok.encode(say(keys[i], values[i])), len(self.tok.encode(str(values[i])))
            ids += piece
            scored += [False] * (len(piece) - digits - tail) + [True] * digits + [False] * tail
        return Doc(ids, [i >= head for i in range(len(ids))], scored)

    def fact(self, rng: random.Random, distance: int) -> Doc:
        """A fact lookup with the asked fact about ``distance`` tokens before the question, as raw text:
        body, question, then the answer "The number of the fox is 42." (scored on the number only)."""
        messages, _ = text.retrieval_example(rng, self.count, distance, n_facts=rng.randint(2, 8),
                                             lead=rng.randint(0, 60))
        prefix, number = messages[1]["content"].rstrip(".").rsplit(" is ", 1)
        body = self.tok.encode(messages[0]["content"], bos=True)
        lead = self.tok.encode(" " + prefix + " is")
        value = self.tok.encode(" " + number)
        ids = body + lead + value + self.tok.encode(".")
        learn = [i >= len(body) for i in range(len(ids))]
        scored = [len(body) + len(lead) <= i < len(body) + len(lead) + len(value) for i in range(len(ids))]
        return Doc(ids, learn, scored)

    def picture(self, rng: random.Random, easy: bool = False) -> Doc:
        """A chat about a picture of the spec's distribution (``easy``: one large shape), as herd
        train reads one: 1-4 questions, the answers learned and scored."""
        from experiments.herd_tiny.build import EASY_SIZE
        scene = shapes.random_scene(rng, 1, EASY_SIZE) if easy else shapes.random_scene(rng)
        chat = self.tok.apply_chat_template(shapes.conversation(scene, scene.draw(), rng), add_generation_prompt=False)
        learn = list(chat.assistant_mask)
        return Doc(list(chat.ids), learn, learn, chat.pixel_values)


def pack_rows(make_doc, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Rows of whole documents from ``make_doc()`` (too long ones are drawn again), as TextModel's
    packed-row inputs: tokens, targets (IGNORE_INDEX where nothing is learned), segments, positions,
    `scored` (targets the accuracy counts) and `pixels` (the pictures' tiles in row-major order, or None)."""
    out = {"tokens": torch.zeros(rows, seq_len, dtype=torch.long),
           "targets": torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long),
           "segments": torch.full((rows, seq_len), -1, dtype=torch.long),
           "positions": torch.zeros(rows, seq_len, dtype=torch.long),
           "scored": torch.zeros(rows, seq_len, dtype=torch.bool)}
    pixels = []
    for b in range(rows):
        at = j = 0
        while True:
            ids, learn, scored, tiles = make_doc()
            n = len(ids)
            if n > seq_len:
                if n > 2 * seq_len:
                    raise ValueError(f"documents of {n} tokens do not fit rows of {seq_len}")
                continue
            if at + n > seq_len:
                break
            nxt = torch.tensor(ids[1:])
            out["tokens"][b, at:at + n] = torch.tensor(ids)
            out["targets"][b, at:at + n - 1] = nxt.where(torch.tensor(learn[1:]), IGNORE_INDEX)
            out["scored"][b, at:at + n - 1] = torch.tensor(scored[1:])
            out["segments"][b, at:at + n] = j
            out["positions"][b, at:at + n] = torch.arange(n)
            at, j = at + n, j + 1
            if tiles is not None:
                pixels.append(tiles)
    out["pixels"] = torch.cat(pixels) if pixels else None
    return out


def forward(model: TextModel, r: dict, patch_id: int, vision=None, targets: bool = False) -> torch.Tensor:
    """The decoder on `pack_rows`'s rows, the pictures' features (from the frozen ``vision``) in
    their patch positions; the summed loss with ``targets``, else logits."""
    mask = feats = None
    if r["pixels"] is not None:
        with torch.no_grad():
            feats = vision(r["pixels"]).flatten(0, 1)
        mask = r["tokens"] == patch_id
    if targets:
        return summed_loss(model, r["tokens"], r["targets"], mask, feats, segments_BT=r["segments"],
                           positions_BT=r["positions"])
    return model(r["tokens"], mask, feats, segments_BT=r["segments"], positions_BT=r["positions"])


@torch.no_grad()
def accuracy(model: TextModel, make_doc, rows: int, seq_len: int, patch_id: int = -1,
             vision=None) -> tuple[float, float]:
    """(share of scored tokens predicted, share of documents with every scored token predicted)."""
    was = model.training
    model.eval()
    r = pack_rows(make_doc, rows, seq_len)
    right = forward(model, r, patch_id, vision).argmax(-1) == r["targets"]
    model.train(was)
    hit = right & r["scored"]
    docs = whole = 0
    for b in range(rows):
        for s in r["segments"][b].unique().tolist():
            mask = r["scored"][b] & (r["segments"][b] == s)
            if s >= 0 and mask.any():
                docs += 1
                whole += bool(hit[b][mask].sum() == mask.sum())
    return hit.sum().item() / max(1, r["scored"].sum().item()), whole / max(1, docs)


def build_model(cfg: ProbeConfig, vocab_size: int) -> TextModel:
    from experiments.herd_tiny.build import text_config
    from herd.train.trainer import init_for_training
    model = TextModel(text_config(vocab_size, cfg.layers, cfg.nope_every, cfg.moe_every, cfg.dim, cfg.heads, cfg.chunk,
                                  cfg.qk_norm))
    init_for_training(model, cfg.seed, 0.02, cfg.layers)
    return model


def probe(cfg: ProbeConfig, tokenizer: str | Path = DEFAULT_TOKENIZER, log=print) -> list[dict]:
    """Train and measure as the module docstring says; returns one record per measurement."""
    from herd.train.trainer import lr_factor, param_groups
    from experiments.herd_tiny.build import VISION
    torch.manual_seed(cfg.seed)
    docs = Documents(Tokenizer.from_hf_json(tokenizer), cfg.chunk, VISION if cfg.encoder else None)
    model = build_model(cfg, docs.tok.vocab_size).train()
    vision = None
    if cfg.encoder:
        from herd.model.vision import VisionModel
        from herd.train.trainer import load_start
        vision = VisionModel(VISION, cfg.dim)
        load_start(vision, Path(cfg.encoder), "probe --encoder", "this encoder's weights")
        vision.eval().requires_grad_(False)
    state = {}  # the curriculum state and steps a --save wrote
    if cfg.init:
        from herd.train.trainer import load_start
        state = load_start(model, Path(cfg.init), "probe --init", "this decoder's weights")
    opt = torch.optim.AdamW(param_groups(list(model.named_parameters()), 0.1, cfg.lr), betas=(0.9, 0.95))
    rng, fresh = random.Random(cfg.seed + 1), random.Random(cfg.seed + 2)
    long = 2 * cfg.seq_len
    tests = {"near": lambda: docs.word_list(fresh, fresh.randint(8, 25)),
             "straddle": lambda: docs.word_list(fresh, fresh.randint(8, 25), straddle=True),
             "far": lambda: docs.word_list(fresh, fresh.randint(72, 160))}
    facts = {"fact_near": lambda: docs.fact(fresh, fresh.randint(0, 60)),
             "fact_far": lambda: docs.fact(fresh, fresh.randint(4 * cfg.chunk, 6 * cfg.chunk))}
    pair = lambda r, lo, hi: docs.pairs(r, r.randint(2, 6), r.randint(lo, hi), cfg.pairs_shuffle, cfg.pairs_bare)  # noqa: E731
    pair_tests = {"pairs_near": lambda: pair(fresh, 0, 30), "pairs_far": lambda: pair(fresh, 4 * cfg.chunk, 5 * cfg.chunk)}
    nmax = int(state.get("nmax", cfg.nmax))
    dmax = int(state.get("dmax", 0 if cfg.pair_grow else cfg.max_distance))
    history, t0 = [], time.time()

    def train_doc() -> Doc:
        if step < cfg.image_first:
            return docs.picture(rng, easy=rng.random() < 0.5)
        if cfg.images and nmax >= cfg.images_at and rng.random() < cfg.images:
            return docs.picture(rng)
        if nmax >= cfg.facts_at and rng.random() < cfg.facts:
            return docs.fact(rng, rng.randint(0, cfg.max_distance))
        if nmax >= cfg.facts_at and rng.random() < cfg.pairs:
            return pair(rng, 0, dmax)
        n = rng.randint(cfg.nmin, nmax)
        return docs.word_list(rng, n, straddle=n <= 25 and rng.random() < cfg.straddle)

    for step in range(cfg.steps + 1):
        if step % cfg.every == 0:
            rec = {"step": step, "nmax": nmax}
            if vision is not None:
                rec["pictures"] = accuracy(model, lambda: docs.picture(fresh), 8, long, docs.patch_id, vision)[1]
            rec.update({k: accuracy(model, f, 4, long)[0] for k, f in tests.items()})
            if cfg.pairs and nmax >= cfg.facts_at:
                rec["dmax"] = dmax
                rec.update({k: accuracy(model, f, 4, long)[0] for k, f in pair_tests.items()})
                if cfg.pair_grow:
                    top = dmax
                    rec["pairs_top"] = accuracy(model, lambda: pair(fresh, max(0, top - 30), top), 4, long)[0]
                    if rec["pairs_top"] >= cfg.switch and dmax < cfg.max_distance:
                        dmax = min(cfg.max_distance, dmax + cfg.pair_grow)
            if nmax >= cfg.facts_at:
                rec.update({k: accuracy(model, f, 24, long)[1] for k, f in facts.items()})
            if cfg.grow:
                top = nmax
                rec["top"] = accuracy(model, lambda: docs.word_list(fresh, fresh.randint(max(cfg.nmin, top - 10), top)),
                                      4, long)[0]
                if rec["top"] >= cfg.switch and nmax < cfg.far_nmax:
                    nmax = min(cfg.far_nmax, nmax + cfg.grow)
            rec["seconds"] = round(time.time() - t0)
            history.append(rec)
            log(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        if step == cfg.steps or (cfg.stop_at and rec.get("fact_far", 0.0) >= cfg.stop_at):
            break
        short = 2 * nmax + 8 <= cfg.seq_len and cfg.facts_at > nmax  # facts and pairs need long rows
        r = pack_rows(train_doc, cfg.rows if short else cfg.rows // 2, cfg.seq_len if short else long)
        loss = forward(model, r, docs.patch_id, vision, targets=True) / (r["targets"] != IGNORE_INDEX).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            # warm-up, then constant; a resumed run warms up again: its optimizer moments start afresh
            g["lr"] = cfg.lr * lr_factor(step, cfg.warmup, cfg.steps, min_ratio=1.0)
        opt.step()
    if cfg.save:
        from herd.train.trainer import save_start
        done = int(state.get("step", 0)) + step  # counted over every run this one resumes
        save_start(model, cfg.save, {"step": str(done), "nmax": str(nmax), "dmax": str(dmax), "config": str(asdict(cfg))})
    return history


def add_arguments(ap) -> None:
    """One --option per ProbeConfig field (booleans as 0/1)."""
    for f in fields(ProbeConfig):
        kind = int if isinstance(f.default, bool) else type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, dest=f.name,
                        help=f.metadata["help"] + " (default: %(default)s)")


def config_from(args) -> ProbeConfig:
    return ProbeConfig(**{k: (bool(v) if isinstance(getattr(ProbeConfig, k, None), bool) else v)
                          for k, v in vars(args).items() if k in ProbeConfig.__dataclass_fields__})
