"""Everything herd-tiny is trained from, built from seeds: its BPE tokenizer (with Llama 4's
special tokens and chat format), its architecture (config.json) and its training data.

`python -m experiments.herd_tiny data OUT` writes into OUT:
  tokenizer.json, tokenizer_config.json (chat template), config.json, preprocessor_config.json
  train.jsonl, val.jsonl, images/*.png
Records are chats (`messages`: only the assistant's tokens are learned) or raw text (`text`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from herd.config import MoEConfig, TextConfig, VisionConfig, every, rope_layout, to_hf_config
from experiments.herd_tiny import chats, shapes, text
from herd.tokenizer.tokenizer import SPLIT_PATTERN, Tokenizer, llama4_special_tokens

BPE_RANKS = 2048  # learned byte-level BPE tokens (256 bytes + merges); Llama 4's 2,048 specials follow
# One 224-px tile per image: 16x16 patches of 14 px -> 64 tokens after the pixel shuffle. At 112 px
# a shape covers only 1-3 patches and the encoder did not learn shapes (single-shape shape accuracy
# 34-44% = chance after 600-2000 pretraining steps; 90% after 300 steps at 224 px, measured).
TILE = 224
MAX_TILES = 1

# The chat template HF tokenizers apply (Llama 4's format); herd itself uses herd.tokenizer.chat_format.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)


def text_config(vocab_size: int, layers: int = 8, nope_every: int = 4, moe_every: int = 2, dim: int = 256,
                heads: int = 4, chunk: int = 64, qk_norm: bool = True) -> TextConfig:
    """A herd-tiny decoder: width 256, MoE on every 2nd layer with 8 experts top-1 + a shared expert,
    dense FFN 512 on the others; head_dim 64, half as many key/value heads as query heads. The
    defaults are the first build's (8 layers, every 4th NoPE, chunk 64, QK-norm on the RoPE layers:
    Llama 4's default); the keywords are the lookup probe's knobs (experiments/herd_tiny/probe.py), and the
    shipped decoder is the probe's (LOOKUPS_DECODER: 4 layers, every 2nd NoPE, no QK-norm)."""
    return TextConfig(
        vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=max(1, heads // 2), head_dim=64,
        ffn_dim=2 * dim, uses_rope=rope_layout(layers, nope_every), is_moe=every(layers, moe_every),
        moe=MoEConfig(num_experts=8, top_k=1, expert_dim=dim), attention_chunk_size=chunk, max_seq_len=8192,
        rope_theta=500000.0, use_qk_norm=qk_norm)


VISION = VisionConfig(image_size=TILE, patch_size=14, dim=128, n_layers=3, n_heads=4, mlp_dim=512, output_dim=256,
                      pixel_shuffle_ratio=0.5, projector_input_dim=256, projector_output_dim=256)


# ---- tokenizer -----------------------------------------------------------------------------------


def tokenizer_corpus(seed: int, n_stories: int = 6000) -> list[str]:
    """Text the BPE merges are learned from: stories, every question and answer form, facts."""
    rng = random.Random(seed)
    out = [text.story(rng) for _ in range(n_stories)]
    for _ in range(2000):
        scene = shapes.random_scene(rng)
        out += [q + " " + a for _, q, a in shapes.questions(scene, rng)]
    out += [text.fact(k, v) + " " + q.format(key=k) for k in text.KEYS for v in range(10, 100)
            for q in text.ASK_FACT[:1]]
    out += [r.format(hero=h) for r in text.STORY_REQUESTS for h in text.NAMES]
    return out


def train_tokenizer(out: Path, seed: int = 0, ranks: int = BPE_RANKS) -> Tokenizer:
    """A byte-level BPE of at most ``ranks`` tokens (fewer when every word is whole by then) on the generated corpus, Meta's pre-tokenizer regex, and
    Llama 4's 2,048 special tokens after them (the same order as Llama 4's)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer)
    tok.add_special_tokens(llama4_special_tokens())
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>", "model_max_length": 8192, "chat_template": CHAT_TEMPLATE}, indent=2))
    return Tokenizer.from_hf_json(out / "tokenizer.json")


def write_config(out: Path, tok: Tokenizer, **decoder) -> None:
    """config.json (``decoder``: `text_config`'s keywords) and preprocessor_config.json."""
    cfg = to_hf_config(text_config(tok.vocab_size, **decoder), VISION, tok.special_tokens)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    # transformers' Llama4ImageProcessorFast reads max_patches; herd.load takes its max_tiles from it.
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessorFast", "size": {"height": TILE, "width": TILE},
        "max_patches": MAX_TILES, "resize_to_max_canvas": False, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=2))


# ---- training data ---------------------------------------------------------------------------------


@dataclass
class Mix:
    """How many records of each kind a split gets, and the curriculum's warm-up block."""

    first_copies: int = 9_500  # the text-first block: short passages to repeat (first_copy_tokens), nothing else
    first_copy_tokens: tuple[int, int] = (20, 60)
    lookup_copies: int = 1_000  # then copies (copy_tokens) and fact lookups mixed, still before any image
    lookup_retrieval: int = 1_000
    images: int = 50_000  # chats about one image of the spec's distribution, 1-4 questions each
    easy_images: int = 6_000  # one large shape (EASY_SIZE of the shorter side), 1-4 questions
    warmup_images: int = 5_000  # of `images`, how many join the easy ones in the warm-up block
    warmup_retrieval: int = 0  # fact lookups and stories in the warm-up block (0, 0: images only): a
    warmup_stories: int = 0  # decoder that already reads facts (model.text_init) keeps them through it
    stories: int = 7_000  # raw text
    story_chats: int = 3_000  # "tell me a story about X"
    retrieval: int = 6_500  # long-context fact lookups, every fact asked (2-8 questions)
    max_distance: int = 400  # tokens between the first asked fact and its question (uniform 0..max)
    copies: int = 3_000  # "Repeat the text." over a passage of copy_tokens (uniform)
    copy_tokens: tuple[int, int] = (60, 240)
    chats: int = 0  # conversations as people hold them (experiments/herd_tiny/chats.py)
    chat_shares: dict[str, float] | None = None  # their forms (chats.FORMS; None: its own shares)


# The text-first block: in-context copying (find where the previous token stood, emit what followed
# it) is what a fact lookup needs, and it did not form when copies were ~10% of a mixed stage (the
# model could not repeat 30 tokens after 1,400 steps). Alone, it forms abruptly: in a probe on this
# decoder, teacher-forced copy accuracy went 0.50 -> 0.76 in 300 steps and 0.93 at step 400; fact
# lookups then rose from 0 to 0.55 in 300 steps of a copy / lookup mix (measured). But most of that
# is the story grammar, not a lookup: after this block alone (450 steps), next-token accuracy was
# 0.88 in the repetition and already 0.73 in the passage itself, where nothing can be copied, and
# greedy fact answers were exact 0/40 even with the fact within one chunk (measured 2026-12-02). The
# lookup probe's curriculum forms them (the `lookups` build: training starts from the probe's decoder).
# The warm-up block: a from-scratch encoder and decoder learn to read pictures from image chats alone,
# large shapes helping, and keep the skill once text joins; mixed with text from the start (a few
# image answers among thousands of text targets per step), or with the encoder at the decoder's
# learning rate, they stayed at chance in probes (colour 4/16 at steps 200-600 of a full run). From the
# probe's decoder, an image-only block cost the lookups (the loss jumped to 5-8 where text came back,
# and list copying fell from 0.97 to 0.29): its fact lookups and stories (~12% of its records) keep them.
EASY_SIZE = (0.5, 0.9)

# The shipped build, `lookups` (`python -m experiments.herd_tiny data`, `scripts/train-herd-tiny`): herd train
# starts from the lookup probe's decoder (its architecture: the probe's defaults), with no text-first
# block and fact lookups and stories in the warm-up block; then a second stage (PICTURES_MIX, the
# `pictures` split; recipes/herd-tiny-pictures.toml) trains on fresh pictures, keeping lookups and
# stories. Without it the first stage counted 88% and described 52% of pictures (2,400 steps; 1,200
# gave 67% and 49%); with it, 93.5% and 91% (README: herd-tiny).
LOOKUPS_DECODER = dict(layers=4, nope_every=2, qk_norm=False)
LOOKUPS_MIX = Mix(first_copies=0, lookup_copies=0, lookup_retrieval=0, warmup_retrieval=1_500, warmup_stories=1_000)
PICTURES_MIX = Mix(first_copies=0, lookup_copies=0, lookup_retrieval=0, images=20_000, easy_images=0, warmup_images=0,
                   stories=1_000, story_chats=300, retrieval=1_500, copies=0)
PICTURES_SEED = 101  # added to the build's seed: the pictures split's own images and facts
# A third stage (the `chats` split; recipes/herd-tiny-chats.toml) from the second's model: the
# conversation forms of experiments/herd_tiny/chats.py, with single-picture chats, stories and fact
# lookups kept so the first stages' skills stay.
CHATS_MIX = Mix(first_copies=0, lookup_copies=0, lookup_retrieval=0, images=4_000, easy_images=0, warmup_images=0,
                stories=600, story_chats=200, retrieval=1_500, copies=0, chats=5_000)
CHATS_SEED = 202
# A fourth stage (the `conversations` split; recipes/herd-tiny-conversations.toml) from the third's model:
# more of the forms where a picture comes after text or beside another (the third stage counted a
# picture after a story 75% right), fewer that open with the picture.
CONVERSATIONS_MIX = Mix(first_copies=0, lookup_copies=0, lookup_retrieval=0, images=4_000, easy_images=0,
                        warmup_images=0, stories=500, story_chats=150, retrieval=1_500, copies=0, chats=6_000,
                        chat_shares={"picture first": 0.05, "text first": 0.45, "text between": 0.15,
                                     "two pictures": 0.25, "outside": 0.10})
CONVERSATIONS_SEED = 505


def _image_chat(rng: random.Random, img_dir: Path, name: str, i: int, easy: bool) -> dict:
    scene = shapes.random_scene(rng, 1, EASY_SIZE) if easy else shapes.random_scene(rng)
    path = img_dir / f"{'easy' if easy else ''}{i:06d}.png"
    scene.draw().save(path, compress_level=1)
    return {"messages": shapes.conversation(scene, f"images/{name}/{path.name}", rng)}


def _retrieval_chat(rng: random.Random, count, max_distance: int) -> dict:
    n_facts = rng.randint(2, 8)
    messages, _ = text.retrieval_example(rng, count, rng.randint(0, max_distance), n_facts=n_facts,
                                         lead=rng.randint(0, 60), n_questions=n_facts)
    return {"messages": messages}


def write_split(out: Path, name: str, tok: Tokenizer, mix: Mix, seed: int, progress: bool = True) -> Path:
    """``name``.jsonl and its images under out/images/``name``/. Records come in curriculum order: a
    text-first block (short copies, then copies and fact lookups), a warm-up block
    (the easy images, ``warmup_images`` of the others, ``warmup_stories`` stories and
    ``warmup_retrieval`` fact lookups), then the rest; each block shuffled. The recipe
    trains in file order (data.shuffle = false)."""
    rng = random.Random(seed)
    img_dir = out / "images" / name
    img_dir.mkdir(parents=True, exist_ok=True)
    count = lambda s: len(tok.encode(s))  # noqa: E731
    copy = lambda lengths: {"messages": text.copy_example(rng, count, rng.randint(*lengths))}  # noqa: E731
    fact = lambda: _retrieval_chat(rng, count, mix.max_distance)  # noqa: E731
    story = lambda: {"text": text.story(rng)}  # noqa: E731
    first = [copy(mix.first_copy_tokens)
             for _ in tqdm(range(mix.first_copies), desc=f"{name}: text-first copies", disable=not progress)]
    lookups = [copy(mix.copy_tokens) for _ in range(mix.lookup_copies)]
    lookups += [fact() for _ in tqdm(range(mix.lookup_retrieval), desc=f"{name}: text-first lookups",
                                     disable=not progress)]
    easy = [_image_chat(rng, img_dir, name, i, True)
            for i in tqdm(range(mix.easy_images), desc=f"{name}: warm-up images", disable=not progress)]
    records = [_image_chat(rng, img_dir, name, i, False)
               for i in tqdm(range(mix.images), desc=f"{name}: images", disable=not progress)]
    warmup = easy + records[:mix.warmup_images] + [story() for _ in range(mix.warmup_stories)]
    warmup += [fact() for _ in range(mix.warmup_retrieval)]
    records = records[mix.warmup_images:]
    records += [story() for _ in range(mix.stories)]
    records += [{"messages": text.story_chat(rng)} for _ in range(mix.story_chats)]
    records += [fact() for _ in tqdm(range(mix.retrieval), desc=f"{name}: retrieval", disable=not progress)]
    records += [copy(mix.copy_tokens) for _ in tqdm(range(mix.copies), desc=f"{name}: copying", disable=not progress)]
    pictures = iter(range(10**9))

    def picture(scene: shapes.Scene) -> str:
        path = img_dir / f"chat{next(pictures):06d}.png"
        scene.draw().save(path, compress_level=1)
        return f"images/{name}/{path.name}"
    records += [{"messages": chats.chat(rng, picture, mix.chat_shares)}
                for _ in tqdm(range(mix.chats), desc=f"{name}: conversations", disable=not progress)]
    for block in (first, lookups, warmup, records):
        rng.shuffle(block)
    records = first + lookups + warmup + records
    path = out / f"{name}.jsonl"
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def build(out: str | Path, seed: int = 0, train: Mix | None = None, val: Mix | None = None,
          progress: bool = True, lookups: bool = True) -> Path:
    """Tokenizer, configs and the splits in ``out``: with ``lookups``, the shipped build's
    (LOOKUPS_DECODER; train: LOOKUPS_MIX, pictures: PICTURES_MIX, chats: CHATS_MIX,
    conversations: CONVERSATIONS_MIX); without, the first build's
    (text_config's defaults, Mix's defaults, no pictures split)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out, seed)
    write_config(out, tok, **(LOOKUPS_DECODER if lookups else {}))
    write_split(out, "train", tok, train or (LOOKUPS_MIX if lookups else Mix()), seed + 1, progress)
    if lookups:
        write_split(out, "pictures", tok, PICTURES_MIX, seed + PICTURES_SEED, progress)
        write_split(out, "chats", tok, CHATS_MIX, seed + CHATS_SEED, progress)
        write_split(out, "conversations", tok, CONVERSATIONS_MIX, seed + CONVERSATIONS_SEED, progress)
    write_split(out, "val", tok, val or Mix(first_copies=0, lookup_copies=0, lookup_retrieval=0, images=400,
                                            easy_images=0, warmup_images=0, stories=400,
                                            story_chats=50, retrieval=100, copies=60), seed + 2, progress)
    return out


def package(final: str | Path, dest: str | Path, runs: list[str | Path] = ()) -> Path:
    """The trained model as shipped: bfloat16 weights, tokenizer, chat template and processor
    config (through `LLM.save_pretrained`), plus the training runs' loss curves (the first run's as
    loss.png, each later stage's as loss-<its folder>.png); written beside ``dest`` and swapped in,
    so a failed packaging leaves the previous model in place."""
    import shutil

    import herd

    dest, runs = Path(dest), [Path(r) for r in runs]
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    llm = herd.load(final, progress=False)
    llm.save_pretrained(tmp, dtype="bfloat16")
    for i, run in enumerate(runs):
        if (run / "loss.png").is_file():
            shutil.copy(run / "loss.png", tmp / ("loss.png" if i == 0 else f"loss-{run.name}.png"))
    (tmp / "README.md").write_text(model_card(llm, runs))
    # herd-tiny answers best greedily: servers that read this (herd serve, vLLM) default to it.
    tok = llm.tokenizer
    (tmp / "generation_config.json").write_text(json.dumps({
        "do_sample": False, "bos_token_id": tok.token_id("<|begin_of_text|>"),
        "eos_token_id": sorted(tok.stop_ids)}, indent=2) + "\n")
    if (dest / "EVAL.md").is_file():  # rewritten by `python -m experiments.herd_tiny eval` afterwards
        shutil.copy(dest / "EVAL.md", tmp / "EVAL.md")
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def model_card(llm, runs: list[Path] = ()) -> str:
    """README.md of the packaged model: what it is, what it learned from, how it was trained."""
    t, v = llm.config.text, llm.config.vision
    n_text, n_vision = t.param_count(), v.param_count(t.dim)
    lines = [
        "# herd-tiny", "",
        "A small Llama 4 that herd trains itself, from nothing, on a 2-core CPU: herd's default model.",
        "Same architecture as Llama 4 Scout / Maverick at toy scale: mixture-of-experts with a shared",
        "expert, iRoPE (chunked-attention RoPE layers, global NoPE layers with temperature tuning),",
        "an early-fusion vision encoder with pixel shuffle, and Llama 4's chat format and special tokens.", "",
        f"- decoder: width {t.dim}, {t.n_layers} layers (NoPE: {[i for i, r in enumerate(t.uses_rope) if not r]}), "
        f"{t.n_heads} heads / {t.n_kv_heads} KV heads of {t.head_dim}, attention chunk {t.attention_chunk_size}, "
        f"MoE on layers {[i for i, m in enumerate(t.is_moe) if m]} ({t.moe.num_experts} experts of width "
        f"{t.moe.expert_dim}, top-{t.moe.top_k}, + shared expert), dense FFN {t.ffn_dim} elsewhere",
        f"- vision: one {v.image_size}-px tile per image, {v.patch_size}-px patches, width {v.dim}, {v.n_layers} layers, "
        f"{llm.tiler.tokens_per_tile} image tokens",
        f"- tokenizer: byte-level BPE of {llm.tokenizer.vocab_size - 2048} tokens (trained with `tokenizers` on the "
        f"generated text) + Llama 4's 2,048 special tokens, vocabulary {llm.tokenizer.vocab_size}",
        f"- parameters: {n_text / 1e6:.1f}M text + {n_vision / 1e6:.1f}M vision, stored in bfloat16", "",
        "Training data: generated by `experiments/herd_tiny` (pictures of coloured circles, squares and triangles with",
        "questions and answers; stories from a seeded grammar; long-prompt fact lookups; passages to",
        "repeat word for word). No outside data;",
        "the data, the generator code and these weights are under herd's licence (Apache-2.0).", "",
        "Recipe: `scripts/train-herd-tiny` (`python -m experiments.herd_tiny data`; `python -m experiments.herd_tiny probe` beside",
        "`python -m experiments.herd_tiny encoder --token-labels`; `herd train recipes/herd-tiny.toml`, then",
        "`herd train recipes/herd-tiny-pictures.toml`, then `herd train recipes/herd-tiny-chats.toml`, then",
        "`herd train recipes/herd-tiny-conversations.toml`;",
        "`python -m experiments.herd_tiny package`, `python -m experiments.herd_tiny eval`).",
        "Loss curves: `loss.png` (and `loss-<stage>.png` for later stages); evaluation: `EVAL.md`.",
    ]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            continue
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        if steps and evals:
            tokens = sum(r["tokens"] for r in steps)
            seconds = tokens / steps[-1]["tokens_per_s"]
            lines += ["", f"Stage `{run.name}`: {steps[-1]['step']} steps, {tokens / 1e6:.1f}M tokens in "
                          f"{seconds / 60:.0f} minutes ({steps[-1]['tokens_per_s']:.0f} tokens/s); held-out loss "
                          f"{evals[0]['eval_loss']:.3f} at step 0, {evals[-1]['eval_loss']:.3f} at the end."]
    return "\n".join(lines) + "\n"
