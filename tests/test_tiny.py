"""herd-tiny: the data generators, its tokenizer and config (nothing hard-codes special token ids),
and how herd.load finds the embedded model."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import herd
from herd.checkpoint.errors import CheckpointError
from herd.bundled import MODELS_DIR
from herd.images import ImageTiler
from experiments.herd_tiny import build, shapes, text
from experiments.herd_tiny.evaluate import named_pairs
from herd.tokenizer.chat_format import ChatTokenizer
from herd.tokenizer.tokenizer import NUM_SPECIAL, llama4_special_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    tok = build.train_tokenizer(out)
    build.write_config(out, tok)
    return out, tok


@pytest.mark.slow
def test_scenes_follow_the_spec():
    rng = random.Random(0)
    for _ in range(300):
        scene = shapes.random_scene(rng)
        w, h = scene.width, scene.height
        assert 64 <= min(w, h) and max(w, h) <= 448 and 0.5 <= w / h <= 2.0
        assert 1 <= len(scene.shapes) <= 3
        assert len({s.color for s in scene.shapes}) == len(scene.shapes)  # distinct colours: answers unambiguous
        short = min(w, h)
        for s in scene.shapes:
            assert 0.15 * short <= s.size <= 0.40 * short and s.kind in shapes.SHAPES
            assert 0 <= s.x and s.x + s.size <= w and 0 <= s.y and s.y + s.size <= h
        for a, b in ((a, b) for i, a in enumerate(scene.shapes) for b in scene.shapes[i + 1:]):
            assert a.x + a.size <= b.x or b.x + b.size <= a.x or a.y + a.size <= b.y or b.y + b.size <= a.y
        assert [s.x + s.size / 2 for s in scene.shapes] == sorted(s.x + s.size / 2 for s in scene.shapes)
        pixels = np.asarray(scene.draw())
        for s in scene.shapes:  # the exact colour sits at the centre of the shape's lower half
            cy, cx = s.y + int(s.size * 0.7), s.x + s.size // 2
            assert tuple(pixels[cy, cx]) == shapes.COLORS[s.color]
        colours = {tuple(p) for p in pixels.reshape(-1, 3)}
        assert colours == {(255, 255, 255), *(shapes.COLORS[s.color] for s in scene.shapes)}


def test_scenes_are_seeded_and_questions_unambiguous():
    a = [shapes.random_scene(random.Random(7)) for _ in range(2)]
    assert a[0] == a[1] and shapes.random_scene(random.Random(8)) != a[0]
    rng = random.Random(1)
    for _ in range(200):
        scene = shapes.random_scene(rng)
        qa = shapes.questions(scene)
        kinds = [s.kind for s in scene.shapes]
        for kind, q, answer in qa:
            if kind == "color":  # asked only about a shape that appears once
                assert kinds.count(q.split()[-1].rstrip("?")) == 1
            if kind == "shape":
                assert len(scene.shapes) == 1
        palette = sorted(scene.shapes, key=lambda s: list(shapes.COLORS).index(s.color))  # one right order
        assert named_pairs(shapes.describe(scene)) == [(s.color, s.kind) for s in palette]
    one = shapes.Scene(100, 100, (shapes.Shape("circle", "orange", 10, 10, 30),))
    assert shapes.describe(one) == "An orange circle." and shapes.count_answer(3) == "There are three shapes."
    with pytest.raises(ValueError, match="n_shapes"):
        shapes.random_scene(rng, 4)


def test_tokenizer_keeps_llama4_specials_and_chat_format(tiny_dir):
    out, tok = tiny_dir
    ranks = tok.vocab_size - NUM_SPECIAL
    assert 256 < ranks <= build.BPE_RANKS
    assert [tok.token_id(n) for n in llama4_special_tokens()] == list(range(ranks, tok.vocab_size))
    assert tok.encode("<|eot|>") != [tok.eot_id]  # text never becomes a special id
    story = text.story(random.Random(3))
    assert tok.decode(tok.encode(story)) == story
    # The Jinja chat template shipped for transformers renders the same prompt herd encodes.
    import jinja2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story about Mia."},
                {"role": "assistant", "content": "Once upon a time, Mia went to the park."},
                {"role": "user", "content": [{"type": "text", "text": "What shape is red?"}]}]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    rendered = jinja2.Environment().from_string(cfg["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=cfg["bos_token"])
    assert rendered == tok.decode(ChatTokenizer.of(tok).apply_chat_template(messages).ids)


def test_config_names_the_tokenizers_ids(tiny_dir):
    out, tok = tiny_dir
    cfg = json.loads((out / "config.json").read_text())
    text_cfg = cfg["text_config"]
    assert text_cfg["vocab_size"] == tok.vocab_size
    assert text_cfg["bos_token_id"] == tok.bos_id != 200000
    assert sorted(text_cfg["eos_token_id"]) == sorted(tok.stop_ids)
    assert cfg["image_token_index"] == tok.token_id("<|patch|>")
    assert cfg["boi_token_index"] == tok.token_id("<|image_start|>")
    from transformers import Llama4Config
    hf = Llama4Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    assert hf.image_token_index == tok.token_id("<|patch|>")
    # Llama 4's own layout is derived, not written down: the bundled tokenizer agrees with it.
    from herd.config import llama4_special_ids
    from herd.tokenizer.tokenizer import Tokenizer
    real = Tokenizer.bundled()
    assert llama4_special_ids(real.vocab_size) == dict(real.special_tokens)


def test_retrieval_example_places_the_fact(tiny_dir):
    _, tok = tiny_dir
    count = lambda s: len(tok.encode(s))  # noqa: E731
    rng = random.Random(5)
    for want in (0, 100, 300):
        messages, distance = text.retrieval_example(rng, count, want, n_facts=5, lead=30, n_questions=3)
        body, question = messages[0]["content"].rsplit("\n\n", 1)
        key = question.split("the ")[-1].split()[0].rstrip("?")
        answer = messages[1]["content"].rstrip(".").split()[-1]
        assert messages[1]["content"] == text.fact(key, int(answer))
        assert body.count(f"The number of the {key} is ") == 1 and text.fact(key, int(answer)) in body
        tail = body.split(text.fact(key, int(answer)), 1)[1]
        assert count(tail.strip()) == distance >= want - 20  # measured: what lies between fact and question
        assert len(messages) == 6 and all(m["role"] == "assistant" for m in messages[1::2])


def test_training_split_starts_with_the_warm_up_block(tiny_dir, tmp_path):
    _, tok = tiny_dir
    mix = build.Mix(first_copies=6, lookup_copies=3, lookup_retrieval=3, images=20, easy_images=10,
                    warmup_images=8, warmup_retrieval=2, warmup_stories=3, stories=20, story_chats=4, retrieval=6,
                    copies=5)
    path = build.write_split(tmp_path, "train", tok, mix, seed=1, progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 82
    is_copy = lambda r: "messages" in r and str(r["messages"][0]["content"]).endswith(text.ASK_REPEAT)  # noqa: E731
    assert all(is_copy(r) and len(tok.encode(r["messages"][1]["content"])) <= 60 for r in records[:6])  # text first
    assert sum(map(is_copy, records[6:12])) == 3 and sum("The number of the" in json.dumps(r) for r in records[6:12]) == 3
    records = records[12:]  # then the warm-up block
    easy = [i for i, r in enumerate(records) if "easy" in json.dumps(r)]
    assert len(easy) == 10 and max(easy) < 23  # the easy chats, 8 others, 3 stories and 2 fact lookups
    warmup = records[:23]
    assert sum("image" in json.dumps(r.get("messages", [{}])[0]) for r in warmup) == 18
    assert sum("text" in r for r in warmup) == 3 and sum("The number of the" in json.dumps(r) for r in warmup) == 2
    from PIL import Image
    for i in easy:  # one shape of at least half the shorter side
        src = records[i]["messages"][0]["content"][0]["image"]
        img = np.asarray(Image.open(tmp_path / src).convert("L")) < 250
        assert max(img.any(0).sum(), img.any(1).sum()) >= 0.5 * min(img.shape) - 1
    copies = [m for m in (r.get("messages") for r in records[23:])
              if m and isinstance(m[0]["content"], str) and m[0]["content"].endswith(text.ASK_REPEAT)]
    assert len(copies) == 5 and all(m[0]["content"].startswith(m[1]["content"] + "\n\n") for m in copies)
    assert all(60 - 8 <= len(tok.encode(m[1]["content"])) <= 240 for m in copies)
    retrieval = [r for r in records if "The number of the" in json.dumps(r)]
    assert retrieval and all(len(r["messages"]) >= 4 for r in retrieval)  # every fact is asked (2-8)
    with pytest.raises(ValueError, match="size must be a range"):
        shapes.random_scene(random.Random(0), 2, build.EASY_SIZE)


@pytest.mark.slow
def test_encoder_pretraining_feeds_herd_train(tiny_dir, tmp_path):
    """`python -m experiments.herd_tiny encoder` writes weights that `herd train` starts its encoder from
    (model.vision_init); files that are not this encoder's are refused, naming the field and file."""
    from safetensors.torch import load_file, save_file

    from herd.checkpoint.errors import CheckpointError
    from experiments.herd_tiny.encoder import labels, pretrain_encoder, tokens_labelled
    from herd.train.config import TrainConfigError, load_config
    from herd.train.trainer import build as build_training
    out, _ = tiny_dir
    scene = shapes.Scene(100, 100, (shapes.Shape("circle", "blue", 5, 5, 20),
                                    shapes.Shape("triangle", "red", 50, 50, 20)))
    assert labels(scene) == [3, 0, 1, 0, 0, 0]  # red: triangle, blue: circle, the rest absent
    # Per image token (8 x 8 squares of 28 px over the 224-px tile the 100-px picture is scaled to):
    # the circle covers squares (0-1, 0-1), the triangle about (4-5, 4-5); the rest is white.
    tiles = ImageTiler(build.VISION, 1)(scene.draw())[0]
    grid = tokens_labelled(tiles, torch.tensor([labels(scene)]), 8)[0].view(8, 8)
    circle, triangle = 1 + 2 * 3 + 0, 1 + 0 * 3 + 2  # 1 + colour * 3 + shape
    assert set(grid[:2, :2].flatten().tolist()) == {circle} and (grid == circle).sum() <= 9
    assert (grid[3:7, 3:7] == triangle).sum() >= 3 and set(grid.unique().tolist()) == {0, circle, triangle}
    result = pretrain_encoder(out / "config.json", tmp_path / "enc.safetensors", steps=2, batch=2, progress=False,
                              token_labels=True)
    assert result["steps"] == 2 and 0 <= result["accuracy"] <= 1
    weights = load_file(tmp_path / "enc.safetensors")
    (tmp_path / "c.toml").write_text(f"[model]\nconfig = '{out / 'config.json'}'\nvision_init = 'enc.safetensors'\n"
                                     "[data]\ntrain = ['x.jsonl']\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # beside the data's config.json: its tiling, no warning
        built = build_training(load_config(tmp_path / "c.toml"))
    assert all(torch.equal(weights[k], v) for k, v in built.vision.state_dict().items())
    (tmp_path / "bare").mkdir()  # a config.json alone: the tiling falls back to Llama 4's, and says so
    shutil.copy(out / "config.json", tmp_path / "bare" / "config.json")
    with pytest.warns(UserWarning, match=r"model.config: no preprocessor_config.json beside .*bare.config.json: "
                                         r"pictures are cut into up to 16 tiles"):
        bare = build_training(load_config(tmp_path / "c.toml", [f"model.config={tmp_path / 'bare' / 'config.json'}",
                                                              f"model.tokenizer={out / 'tokenizer.json'}"]))
    assert bare.tiler.max_tiles == 16 and built.tiler.max_tiles == 1
    (tmp_path / "bare" / "preprocessor_config.json").write_text('{"do_resize": true}')  # says nothing of tiles
    with pytest.warns(UserWarning, match=r"model.config: no max_patches in the preprocessor_config.json beside "
                                         r".*bare.config.json: pictures are cut into up to 16 tiles"):
        build_training(load_config(tmp_path / "c.toml", [f"model.config={tmp_path / 'bare' / 'config.json'}",
                                                        f"model.tokenizer={out / 'tokenizer.json'}"]))
    save_file({k: v for k, v in list(weights.items())[1:]}, str(tmp_path / "enc.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.vision_init: .*enc.safetensors: not this encoder's weights"):
        build_training(load_config(tmp_path / "c.toml"))
    with pytest.raises(TrainConfigError, match="model.vision_init: only for pretrain"):
        load_config(tmp_path / "c.toml", ["job=sft", "model.checkpoint=x", "model.config="])


@pytest.mark.slow
def test_probe_decoder_feeds_herd_train(tiny_dir, tmp_path):
    """`python -m experiments.herd_tiny probe --save` (with herd-tiny's architecture) writes a decoder `herd train`
    starts from (model.text_init), its curriculum state in the metadata; other files are refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from herd.checkpoint.errors import CheckpointError
    from experiments.herd_tiny.probe import ProbeConfig, probe
    from herd.train.config import TrainConfigError, load_config
    from herd.train.trainer import build as build_training
    out, _ = tiny_dir
    dec = tmp_path / "dec.safetensors"
    arch = dict(layers=8, nope_every=4, qk_norm=True, every=1, rows=2)
    probe(ProbeConfig(**arch, steps=1, grow=8, switch=0.0, save=str(dec)), tokenizer=out / "tokenizer.json",
          log=lambda line: None)
    with safe_open(str(dec), "pt") as f:
        assert f.metadata()["step"] == "1" and f.metadata()["nmax"] == "41"
    again = probe(ProbeConfig(**arch, steps=0, init=str(dec), save=str(tmp_path / "again.safetensors")),
                  tokenizer=out / "tokenizer.json", log=lambda line: None)
    assert again[0]["nmax"] == 41  # a run goes on where the saved one stopped, from its weights:
    assert all(torch.equal(v, load_file(dec)[k]) for k, v in load_file(tmp_path / "again.safetensors").items())
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "1"  # steps count over the runs it went on from
    (tmp_path / "c.toml").write_text(f"[model]\nconfig = '{out / 'config.json'}'\ntext_init = 'dec.safetensors'\n"
                                     "[data]\ntrain = ['x.jsonl']\n")
    built = build_training(load_config(tmp_path / "c.toml"))
    weights = load_file(dec)
    assert weights.keys() == built.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in built.model.state_dict().items())
    save_file({k: v for k, v in list(weights.items())[1:]}, str(dec))
    with pytest.raises(CheckpointError, match=r"model.text_init: .*dec.safetensors: not this decoder's weights"):
        build_training(load_config(tmp_path / "c.toml"))
    with pytest.raises(TrainConfigError, match="model.text_init: only for pretrain"):
        load_config(tmp_path / "c.toml", ["job=sft", "model.checkpoint=x", "model.config="])
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(CheckpointError, match=r"probe --init: .*c.toml"):
        probe(ProbeConfig(**arch, steps=0, init=str(tmp_path / "c.toml")), tokenizer=out / "tokenizer.json")
    with pytest.raises(ValueError, match="save = x.pt"):
        ProbeConfig(save="x.pt")


def test_processor_config_sets_tiles_and_bad_values_are_named(tmp_path):
    from herd.checkpoint.folder import folder_max_tiles
    assert folder_max_tiles(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text('{"max_patches": 0}')
    with pytest.raises(CheckpointError, match="preprocessor_config.json: max_patches"):
        folder_max_tiles(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"max_patches": 4}')
    assert folder_max_tiles(tmp_path) == 4
    with pytest.raises(ValueError, match="max_tiles and max_pixels must be >= 1, got 0"):
        herd.load("tiny-moe", max_tiles=0)  # an explicit 0 is refused, not taken for "the default"


def test_mixed_jsonl_records(tiny_dir, tmp_path):
    from herd.train.data import DataError, Encoder
    _, tok = tiny_dir
    enc = Encoder(tok)
    raw = enc.record("x:1", {"text": "A red circle."}, tmp_path)
    assert all(raw.learn) and raw.ids[0] == tok.bos_id
    chat = enc.record("x:2", {"messages": [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello."}]}, tmp_path)
    assert 0 < sum(chat.learn) < len(chat.ids)
    with pytest.raises(DataError, match="x:3: expected a 'messages' list or a string field 'text'"):
        enc.record("x:3", {"txt": "typo"}, tmp_path)


# ---- the embedded model ------------------------------------------------------------------------


def test_a_missing_embedded_model_is_named(monkeypatch, tmp_path):
    import herd.bundled
    monkeypatch.setattr(herd.bundled, "MODELS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="embedded model 'herd-tiny' is missing"):
        herd.load("herd-tiny")


# ---- the embedded model (herd/bundled/herd-tiny: recipes/herd-tiny.toml, then herd-tiny-pictures.toml) ----

COLOR_FLOOR = 14  # of 16 fresh single-shape pictures (EVAL.md: 200 of 200; chance is 1 in 6)
EMBEDDED = MODELS_DIR / "herd-tiny"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llm():
    return herd.load("herd-tiny", progress=False)


def test_embedded_model_is_complete_and_small():
    names = {p.name for p in EMBEDDED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "loss.png", "EVAL.md", "README.md"} <= names
    assert sum(p.stat().st_size for p in EMBEDDED.rglob("*") if p.is_file()) <= 40e6
    assert "chat_template" in json.loads((EMBEDDED / "tokenizer_config.json").read_text())


def test_embedded_model_answers_fresh_pictures(tiny_llm):
    """Fresh pictures (a seed neither training nor EVAL.md used), asked through llm.generate as a user would."""
    rng = random.Random(777)
    scenes = [shapes.random_scene(rng, 1) for _ in range(16)]
    prompts = [[{"role": "user", "content": [{"type": "image", "image": s.draw()},
                                             {"type": "text", "text": shapes.ASK_COLOR[0].format(shape=s.shapes[0].kind)}]}]
               for s in scenes]
    answers = [r.text.strip() for r in tiny_llm.generate(prompts, max_new_tokens=6, temperature=0.0)]
    right = sum(a == f"{s.shapes[0].color.capitalize()}." for s, a in zip(scenes, answers))
    assert right >= COLOR_FLOOR, list(zip([s.shapes[0].color for s in scenes], answers))


def test_retrieval_rows_place_the_fact_and_count_the_key(tiny_llm):
    """The eval's retrieval rows: the asked fact at the measured distance (4-6 chunks, or within one),
    every answer scored, and how many named the asked key (a partial score shown in EVAL.md)."""
    from experiments.herd_tiny.evaluate import report, retrieval_task

    chunk = tiny_llm.config.text.attention_chunk_size
    far = retrieval_task(tiny_llm, random.Random(5), 3)
    near = retrieval_task(tiny_llm, random.Random(5), 3, (0, 1), "retrieval, near")
    for task, (lo, hi) in ((far, (4 * chunk, 6 * chunk)), (near, (0, chunk))):
        assert task.total == 3 and 0 <= task.correct <= 3
        distances = [int(re.search(r"\[(\d+) tokens\]", q).group(1)) for q, _, _ in task.failures]
        assert all(lo <= d <= hi for d in distances)
        key_named = int(re.fullmatch(r"answers naming the asked key: (\d)/3", task.detail).group(1))
        assert task.correct <= key_named  # an exact answer names the key
    md = report({"tasks": [far, near], "text": {"ppl": 2.0, "tokens": 1, "stories": 1, "prompt": "Hi",
                                                "sample": "!", "known_words": 1.0},
                 "seed": 5, "n": 3, "seconds": 1.0, "dtype": "float32"}, "herd-tiny")
    assert "| retrieval, near |" in md and "answers naming the asked key" in md


def test_induction_row_scores_the_repetition_token_by_token(tiny_llm):
    """The eval's induction row: an oracle that knows each next token scores every token of both
    listings; one that predicts the current token scores (almost) none; the shipped model is scored on the
    same tokens (the repetition's, one per position)."""
    from types import SimpleNamespace

    from experiments.herd_tiny.evaluate import induction_task

    def oracle(shift):
        def logits(batch):
            ids = torch.tensor(batch[0])
            pred = torch.cat([ids[shift:], ids[:shift]]) if shift else ids
            return torch.nn.functional.one_hot(pred, tiny_llm.tokenizer.vocab_size).float()[None]
        return SimpleNamespace(tokenizer=tiny_llm.tokenizer, logits=logits)

    perfect = induction_task(oracle(1), random.Random(3), 4)
    assert perfect.correct == perfect.total >= 4 * 8 and perfect.failures == []
    n_first = int(re.fullmatch(r"over the first listing, where nothing can be copied: (\d+)/(\d+)", perfect.detail).group(2))
    assert perfect.detail.endswith(f"{n_first}/{n_first}") and n_first == perfect.total  # the same words twice
    echo = induction_task(oracle(0), random.Random(3), 4)
    assert echo.total == perfect.total and echo.correct <= echo.total // 10  # right only where a token repeats
    far = induction_task(oracle(1), random.Random(3), 2, (72, 100), "induction, far")
    assert far.correct == far.total >= 2 * 72 and "72-100 random words" in far.how
    real = induction_task(tiny_llm, random.Random(3), 4)
    assert real.total == perfect.total and 0 <= real.correct <= real.total
    question, expected, got = real.failures[0] if real.failures else (None, None, None)
    assert question is None or (question.startswith("Words: ") and question.endswith(". Again:"))


def test_embedded_model_finds_far_facts(tiny_llm):
    """Long-context retrieval through llm.generate: the asked fact 4-6 chunks back, so only the NoPE
    layers can reach it (EVAL.md: 191 of 200 on other seeds)."""
    from experiments.herd_tiny.evaluate import retrieval_task
    far = retrieval_task(tiny_llm, random.Random(778), 12)
    assert far.correct >= 10, far.failures


def test_embedded_model_writes_english(tiny_llm):
    from experiments.herd_tiny.evaluate import vocabulary
    reply = tiny_llm.generate([{"role": "user", "content": "Tell me a story about Mia."}], max_new_tokens=40,
                              temperature=0.0).text
    words = re.findall(r"[A-Za-z]+", reply)
    known = vocabulary(random.Random(0))
    assert len(words) >= 20 and sum(w.lower() in known for w in words) >= 0.9 * len(words), reply


def test_readme_first_command_describes_the_example_picture():
    """./scripts/demo with no arguments runs exactly this (README's first command)."""
    assert '--image examples/shapes.png "Describe the image."' in (ROOT / "scripts" / "demo").read_text()
    out = subprocess.run([sys.executable, "-m", "herd", "generate", "--image", "examples/shapes.png",
                          "Describe the image."], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "RANDOM" not in out.stderr, out.stderr
    assert sorted(named_pairs(out.stdout)) == [("green", "circle"), ("yellow", "square")], out.stdout


def test_probe_documents_score_only_what_a_lookup_predicts():
    from experiments.herd_tiny.probe import DEFAULT_TOKENIZER, Documents, pack_rows
    from herd.tokenizer.tokenizer import Tokenizer
    docs = Documents(Tokenizer.from_hf_json(DEFAULT_TOKENIZER), chunk=64)
    rng = random.Random(5)
    for straddle in (False, True):
        ids, learn, scored, pixels = docs.word_list(rng, 20, straddle=straddle)
        assert pixels is None
        rep = [t for t, s in zip(ids, scored) if s]
        again = docs.tok.encode(". Again:")
        start = scored.index(True) - len(again)
        assert ids[start:start + len(again)] == again
        assert docs.tok.decode(rep) == docs.tok.decode(ids[start - len(rep):start])  # the first listing, copied
        assert learn.index(True) == start and all(learn[start:])  # nothing learned before ". Again:"
        assert (start == 64) == straddle  # straddling: the repetition opens the second chunk
    with pytest.raises(ValueError, match="does not fit in one chunk of 64"):
        docs.word_list(rng, 70, straddle=True)
    ids, learn, scored, _ = docs.fact(rng, 300)
    number = docs.tok.decode([t for t, s in zip(ids, scored) if s]).strip()
    body = docs.tok.decode(ids[:learn.index(True)])
    key = re.search(r"number of the (\w+) is$", docs.tok.decode(ids[:scored.index(True)])).group(1)
    assert number.isdigit() and f"The number of the {key} is {number}." in body
    ids, learn, scored, _ = docs.pairs(rng, 4, 100)
    whole = docs.tok.decode(ids)
    first, again = whole.split(" Again:")
    assert docs.tok.decode(ids[:learn.index(True)]) == first and again.count("The number of the") == 4
    asked = re.findall(r"number of the (\w+) is (\d+)\.", again)
    assert sorted(asked) == sorted(re.findall(r"number of the (\w+) is (\d+)\.", first))
    assert [docs.tok.decode([t]) for t, s in zip(ids, scored) if s] == [v for _, v in asked]  # the digits only
    facts = docs.tok.encode(" ".join(f"The number of the {k} is {v}." for k, v in
                                     re.findall(r"number of the (\w+) is (\d+)\.", first)), bos=True)
    assert ids[:len(facts)] == facts and learn.index(True) == len(facts) + 100  # 100 tokens of stories between

    made = [docs.word_list(rng, n) for n in (8, 12, 9, 30)]
    queue = iter(made * 2)
    r = pack_rows(lambda: next(queue), rows=2, seq_len=100)
    for b in range(2):
        segs = r["segments"][b]
        for s in segs.unique().tolist():
            if s < 0:
                continue
            at = (segs == s).nonzero().flatten()
            assert r["positions"][b, at].tolist() == list(range(len(at)))
            ids, learn, scored, _ = made[[len(m[0]) for m in made].index(len(at))]
            assert r["tokens"][b, at].tolist() == ids
            t = r["targets"][b, at[:-1]]
            assert t.tolist() == [i if ok else -100 for i, ok in zip(ids[1:], learn[1:])]
            assert r["scored"][b, at[:-1]].tolist() == scored[1:]
    assert r["pixels"] is None


def test_probe_pictures_are_chats_with_their_tiles(tmp_path):
    """--images / --image-first: picture chats as herd train reads them (the answers learned and
    scored), their tiles packed in row-major order and fed to the frozen encoder's patch positions."""
    from herd.model.vision import VisionModel
    from experiments.herd_tiny.build import VISION
    from experiments.herd_tiny.probe import DEFAULT_TOKENIZER, Documents, ProbeConfig, build_model, forward, pack_rows, probe
    from herd.tokenizer.tokenizer import Tokenizer
    from herd.train.trainer import save_start
    docs = Documents(Tokenizer.from_hf_json(DEFAULT_TOKENIZER), chunk=64, vision=VISION)
    made = [docs.picture(random.Random(i), easy=i == 0) for i in range(4)]
    for ids, learn, scored, pixels in made:
        assert pixels.shape == (1, 3, 224, 224) and ids.count(docs.patch_id) == 64 and learn == scored
        answers = docs.tok.decode([t for t, ok in zip(ids, learn) if ok])
        assert answers.endswith("<|eot|>") and re.search(r"\.<\|eot\|>$", answers)
    queue = iter(made)
    r = pack_rows(lambda: next(queue), rows=2, seq_len=max(len(m.ids) for m in made) + 1)
    placed = []  # the documents in row-major order
    for b in range(2):
        for seg in r["segments"][b].unique().tolist():
            if seg >= 0:
                tokens = r["tokens"][b, r["segments"][b] == seg].tolist()
                placed += [m for m in made if m.ids == tokens]
    assert len(placed) >= 2 and torch.equal(r["pixels"], torch.cat([m.pixels for m in placed]))
    vision = VisionModel(VISION, 256)
    save_start(vision, tmp_path / "enc.safetensors")
    lines = []
    history = probe(ProbeConfig(layers=2, steps=2, every=1, rows=2, image_first=1, images=0.5, images_at=25,
                                encoder=str(tmp_path / "enc.safetensors")), log=lines.append)
    assert all(0.0 <= h["pictures"] <= 1.0 for h in history) and lines[0].startswith("step 0 nmax 25 pictures ")
    model = build_model(ProbeConfig(layers=2), docs.tok.vocab_size)
    assert forward(model, r, docs.patch_id, vision.eval()).shape == (2, r["tokens"].shape[1], docs.tok.vocab_size)
    with pytest.raises(ValueError, match=r"encoder =  \(pictures \(images, image_first\) need the encoder\)"):
        ProbeConfig(images=0.2)
    with pytest.raises(ValueError, match=r"images_at = -1 \(must be >= 0\)"):
        ProbeConfig(images_at=-1)


@pytest.mark.slow
def test_probe_trains_and_reports_each_skill():
    from experiments.herd_tiny.probe import ProbeConfig, probe
    lines = []
    history = probe(ProbeConfig(layers=2, dim=64, steps=2, every=1, rows=2, grow=8, switch=0.0, facts_at=33,
                                pairs=0.5, pair_grow=32), log=lines.append)
    assert [h["step"] for h in history] == [0, 1, 2] and [h["nmax"] for h in history] == [25, 33, 41]
    assert {"near", "straddle", "far", "top"} <= history[0].keys() and "fact_far" in history[1]
    assert "pairs_near" not in history[0] and [h["dmax"] for h in history[1:]] == [0, 32]  # fact lists join with facts
    assert all(0.0 <= h[k] <= 1.0 for h in history[1:] for k in ("pairs_near", "pairs_far", "pairs_top"))
    assert all(0.0 <= h[k] <= 1.0 for h in history for k in ("near", "straddle", "far"))
    assert len(lines) == 3 and lines[0].startswith("step 0 nmax 25 near ")
    with pytest.raises(ValueError, match=r"nmin = 30 \(must be 1 <= nmin <= nmax <= far_nmax\); facts = 1.5"):
        ProbeConfig(nmin=30, facts=1.5)


def test_probe_options_parse_and_explain_themselves():
    """`python -m experiments.herd_tiny probe`: one --option per ProbeConfig field, each with its help line;
    booleans as 0/1."""
    import argparse
    from dataclasses import fields

    from experiments.herd_tiny.probe import ProbeConfig, add_arguments, config_from
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    cfg = config_from(ap.parse_args(["--pairs-shuffle", "0", "--steps", "5", "--lr", "5e-4", "--save", "d.safetensors"]))
    assert cfg == ProbeConfig(pairs_shuffle=False, steps=5, lr=5e-4, save="d.safetensors")
    text = " ".join(ap.format_help().split())
    assert all(" ".join(f.metadata["help"].split()) in text for f in fields(ProbeConfig))
    with pytest.raises(ValueError, match="save = d.pt"):
        config_from(ap.parse_args(["--save", "d.pt"]))


def test_lookups_build_is_the_probes_decoder(tiny_dir, tmp_path):
    """`data` writes the architecture the lookup probe trains by default (its decoder is the
    recipe's model.text_init), and a warm-up block that keeps fact lookups and stories."""
    from herd.config import from_hf_config
    from experiments.herd_tiny.probe import ProbeConfig, build_model
    _, tok = tiny_dir
    build.write_config(tmp_path, tok, **build.LOOKUPS_DECODER)
    written = from_hf_config(json.loads((tmp_path / "config.json").read_text())).text
    assert written == build_model(ProbeConfig(), tok.vocab_size).cfg
    assert written.uses_rope == (True, False, True, False) and not written.use_qk_norm
    mix = build.LOOKUPS_MIX
    assert mix.first_copies == mix.lookup_copies == mix.lookup_retrieval == 0
    assert mix.warmup_retrieval > 0 and mix.warmup_stories > 0
    pics = build.PICTURES_MIX  # the second stage: pictures, lookups and stories kept, no curriculum blocks
    assert pics.images > 0 and pics.retrieval > 0 and pics.stories > 0
    assert pics.first_copies == pics.lookup_copies == pics.lookup_retrieval == pics.easy_images == pics.warmup_images == 0


def test_cli_names_a_bad_option_without_a_traceback(capsys):
    from experiments.herd_tiny.__main__ import main
    assert main(["probe", "--steps", "-1", "--switch", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: probe: ") and "steps = -1" in err and "switch = 2" in err and "Traceback" not in err


def test_recipes_chain_the_shipped_builds_stages():
    """recipes/herd-tiny.toml (from the probe's decoder and the encoder) then recipes/herd-tiny-pictures.toml
    (from stage 1's exported model, on the `pictures` split, the same held-out rows), then the chats and
    conversations stages, each from the one before; every recipe loads."""
    from herd.train.config import load_config
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        load_config(path)
    one, two = load_config(ROOT / "recipes" / "herd-tiny.toml"), load_config(ROOT / "recipes" / "herd-tiny-pictures.toml")
    run = (ROOT / "runs" / "herd-tiny").resolve()
    assert Path(one.out_dir).resolve() == run / "train" and one.job == "pretrain"
    assert Path(one.model.text_init).resolve() == run / "data" / "decoder.safetensors"
    assert Path(one.model.vision_init).resolve() == run / "data" / "encoder.safetensors"
    assert two.job == "sft" and Path(two.out_dir).resolve() == run / "pictures"
    assert Path(two.model.checkpoint).resolve() == run / "train" / "final"  # relative to the recipe, before it exists
    assert [Path(p).resolve() for p in two.data.train] == [run / "data" / "pictures.jsonl"]
    assert two.data.val == one.data.val and two.optim.lr < one.optim.lr
    three = load_config(ROOT / "recipes" / "herd-tiny-chats.toml")
    assert three.job == "sft" and Path(three.out_dir).resolve() == run / "chats"
    assert Path(three.model.checkpoint).resolve() == run / "pictures" / "final"
    assert [Path(p).resolve() for p in three.data.train] == [run / "data" / "chats.jsonl"]
    assert three.data.val == one.data.val
    four = load_config(ROOT / "recipes" / "herd-tiny-conversations.toml")
    assert four.job == "sft" and Path(four.out_dir).resolve() == run / "conversations"
    assert Path(four.model.checkpoint).resolve() == run / "chats" / "final"
    assert [Path(p).resolve() for p in four.data.train] == [run / "data" / "conversations.jsonl"]
    assert four.data.val == one.data.val
    script = (ROOT / "scripts" / "train-herd-tiny").read_text()
    assert script.index("herd train recipes/herd-tiny.toml") < script.index("herd train recipes/herd-tiny-pictures.toml") \
        < script.index("herd train recipes/herd-tiny-chats.toml") \
        < script.index("herd train recipes/herd-tiny-conversations.toml") < script.index('package "$run/conversations/final"')


def _user_texts(messages: list[dict]) -> list[str]:
    return [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"]
            for m in messages if m["role"] == "user"]


def test_conversations_hold_out_wordings_and_orders_and_answer_rightly():
    """experiments/herd_tiny/chats.py: no training chat holds a held-out wording (any case, any final mark)
    or a picture after three text turns, in the third stage's shares of forms and the fourth's; turns
    alternate; a two-picture question names its picture."""
    from experiments.herd_tiny import chats

    def pattern(template: str) -> re.Pattern:
        body = re.escape(template.rstrip("?.!").lower())
        colors, kinds = "|".join(shapes.COLORS), "|".join(shapes.SHAPES)
        for field, words in (("shape", f"({kinds})"), ("color", f"({colors})"), ("thing", f"an? ({colors}) ({kinds})")):
            body = body.replace(re.escape("{" + field + "}"), words)
        return re.compile(rf"(in the (first|second) picture, )?{body}[?.!]?$")

    kinds = (chats.SHAPE, chats.COLOR, chats.SHAPE_OF, chats.COUNT, chats.DESCRIBE, chats.IS_THERE, chats.GREETINGS)
    held = [pattern(t) for k in kinds for t in k[1]]
    trained = [pattern(t) for k in kinds for t in k[0]] + [pattern(r) for r in text.STORY_REQUESTS]
    # Questions outside its world: held-out forms (any words), and trained forms with a held-out word.
    def outside(form: str, side: int | None) -> re.Pattern:
        body = re.escape(form.rstrip("?.!").lower())
        for k, v in chats.OUTSIDE_WORDS.items():
            words = v[0] + v[1] if side is None else v[side]
            body = body.replace(re.escape("{" + k + "}"), f"({'|'.join(words).lower()})")
        return re.compile(body.replace(re.escape("{a}"), "[0-9]+").replace(re.escape("{b}"), "[0-9]+") + "[?.!]?$")

    held += [outside(f, None) for f in chats.OUTSIDE_FORMS[1]]
    held += [outside(f, 1) for f in chats.OUTSIDE_FORMS[0] if "{" in f and "{a}" not in f]
    trained += [outside(f, 0) for f in chats.OUTSIDE_FORMS[0]]
    from experiments.herd_tiny.build import CONVERSATIONS_MIX
    shares = CONVERSATIONS_MIX.chat_shares  # the fourth stage's: the same forms, in other shares
    rng, seen_two, seen_outside, text_first = random.Random(5), 0, 0, [0, 0]
    for i in range(4000):
        messages = chats.chat(rng, lambda scene: scene, shares if i % 2 else None)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        for q in _user_texts(messages):
            assert not any(h.match(q.lower()) for h in held), q
            assert any(t.match(q.lower()) for t in trained) or re.match(r"(can you tell|write|please write|tell) .*"
                                                                        r"(story|stories)", q.lower()), q
        pictures = [i for i, m in enumerate(messages) if not isinstance(m["content"], str)]
        assert not pictures or pictures[0] // 2 <= 2  # at most two text turns before the first picture
        text_first[i % 2] += bool(pictures) and pictures[0] > 0 and messages[-1]["content"] != chats.OUTSIDE_ANSWER
        seen_outside += any(m["content"] == chats.OUTSIDE_ANSWER for m in messages)
        if len(pictures) == 2:
            seen_two += 1
            scenes = [messages[i]["content"][0]["image"] for i in pictures]
            for q, a in zip(messages[pictures[1] + 2::2], messages[pictures[1] + 3::2]):
                which = q["content"].lower().split(" picture")[0].removeprefix("in the ")
                scene = scenes[chats.ORDINALS.index(which)]
                if "how many" in q["content"].lower() or "count" in q["content"].lower():
                    assert a["content"] == shapes.count_answer(len(scene.shapes))
    assert seen_two > 300 and seen_outside > 300
    assert 0.35 < text_first[0] / 2000 < 0.45 and 0.40 < text_first[1] / 2000 < 0.50  # 40% and 45% of the chats
    # Answers to "is there ..." follow the scene; both answers occur.
    scene = shapes.random_scene(random.Random(1), 2)
    answers = {a for _ in range(50) for k, q, a in chats.questions(scene, rng) if k == "is_there"}
    assert answers == {"Yes.", "No."}
