"""herd's Tokenizer against Meta's reference (llama_models.llama4.tokenizer) on the real tokenizer.model."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from herd.tokenizer.tokenizer import (LLAMA4_VOCAB_SIZE, StreamDecoder, Tokenizer, TokenizerError,
                                      split_like_meta)

SENTENCES = {
    "english": "The quick brown fox jumps over the lazy dog, doesn't it? We'll see at 3:45 p.m. on Tuesday.",
    "spanish": "¿Dónde está la biblioteca? Mañana iremos al museo con nuestros niños pequeños.",
    "french": "L'été dernier, nous sommes allés à la plage près de Marseille ; c'était magnifique !",
    "german": "Die Straßenbahn fährt über die Brücke, während Jürgen sein Frühstück genießt.",
    "italian": "Perché non andiamo a mangiare una pizza stasera? Il ristorante è già prenotato.",
    "portuguese": "A informação está disponível no coração da cidade, ao lado da estação de trem.",
    "chinese": "我今天早上在公园里跑步，然后和朋友一起喝了一杯咖啡。",
    "arabic": "ذهبت إلى السوق صباح اليوم واشتريت بعض الخضروات الطازجة.",
    "hindi": "आज मौसम बहुत अच्छा है, चलो पार्क में घूमने चलते हैं।",
    "japanese": "昨日、東京の本屋で面白い小説を見つけました。カタカナもひらがなも混ざっています。",
    "korean": "오늘은 날씨가 정말 좋아서 친구와 함께 한강 공원에 산책하러 갔어요.",
    "indonesian": "Saya sedang belajar memasak nasi goreng bersama keluarga di rumah nenek.",
}
CORPUS = {
    **SENTENCES,
    "code": 'def area(r: float) -> float:\n\treturn 3.14159 * r ** 2  # π r²\r\n\nprint({"k": [1, 2]}, re.sub(r"\\s+", " ", s))\n',
    "emoji": "👩‍👩‍👧‍👦 🏳️‍🌈 🧑🏽‍💻 👍🏿 🦙🦙 ❤️‍🔥 🇫🇷🇯🇵 ✅ 😶‍🌫️",
    "whitespace": "  leading\n\n\n\ttabs\t\t  \r\n   trailing   \n\u00a0nbsp\u2003em\u3000ideographic \x0b\x0c\n\n",
    "lookalikes": "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|><|eom|><|end_of_text|>"
                  "<|python_start|>x<|python_end|> <|image|><|patch|> <|reserved_special_token_5|> <|nope|>",
    "numbers": "3 33 333 3333 33333 3.14159 1,000,000 0x1F 1e-9 ----==== ''''```\"\"\"......!!!???",
    "contractions": "I'VE been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea? We'Ve a'lL",
    "scripts": "ünïcödé café naïve Ελληνικά русский язык עברית ไทย កាន់តែពិសេសអាច 我想在apple工作1314151天～",
    "surrogates": "lone \ud800 high and \udfff low, a pair \ud83e\udd99 joined",
    "empty": "",
}


def _random_text(n: int, alphabet: str, seed: int) -> str:
    return "".join(random.Random(seed).choice(alphabet) for _ in range(n))


NONSPACE = "abcdefXYZ0123_-+=/.;é中"
WORDS = "".join(SENTENCES.values()) + "\n"
LONG = {
    # Three 400k windows, cut mid-word.
    "three_windows": (WORDS * (820_000 // len(WORDS) + 1))[:820_003],
    "nonspace_run_30k": "start " + _random_text(30_000, NONSPACE, 1) + " end",
    "space_run_60k": "a" + _random_text(60_000, " \t\n\r\u3000", 2) + "b",
    "exact_run_limits": "x" * 25_000 + " " + "y" * 25_001 + " " * 25_000 + "z" + " " * 25_001 + "q" * 50_001,
    # A 30k run that crosses the 400k window edge: the run counter restarts in the new window.
    "run_across_window": "word " * 79_998 + _random_text(30_000, NONSPACE, 3) + " tail",
}


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer.get_instance()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.bundled()


@pytest.fixture(scope="session")
def hf_json(tmp_path_factory):
    """A tokenizer.json converted from the real tokenizer.model, as Hugging Face's Llama 4 one was made."""
    from llama_models.llama4 import tokenizer as l4
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    names = l4.BASIC_SPECIAL_TOKENS + l4.LLAMA4_SPECIAL_TOKENS
    names += [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(names))]
    model_file = Tokenizer.bundled().path
    converted = TikTokenConverter(vocab_file=str(model_file), pattern=l4.Tokenizer.O200K_PATTERN,
                                  extra_special_tokens=names).converted()
    # HF's file prepends BOS in its post-processor; herd must ignore that (BOS is the caller's choice).
    converted.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 200000)])
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    converted.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tok(hf_json):
    return Tokenizer.from_hf_json(hf_json)


def _tiny_hf_spec() -> dict:
    """A small valid ByteLevel BPE tokenizer.json: 26 letters, then Llama 4's 2,048 specials."""
    from herd.tokenizer.tokenizer import llama4_special_tokens

    letters = "abcdefghijklmnopqrstuvwxyz"
    added = [{"id": 26 + i, "content": name, "special": True, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False} for i, name in enumerate(llama4_special_tokens())]
    return {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": False},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                                                "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(letters)}, "merges": []}}


def _meta_pieces(meta_cls, text: str) -> list[str]:
    return [p for i in range(0, len(text), 400_000)
            for p in meta_cls._split_whitespaces_or_nonwhitespaces(text[i:i + 400_000], 25_000)]


# ---- identity with Meta ---------------------------------------------------------------------


def test_special_tokens_and_ids_match_meta(tok, meta):
    assert dict(tok.special_tokens) == meta.special_tokens
    assert tok.vocab_size == meta.n_words == LLAMA4_VOCAB_SIZE == 202_048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id) == (200000, 200001, 200018)
    assert tok.stop_ids == frozenset(meta.stop_tokens) == {200001, 200007, 200008}
    spec = {"<|header_start|>": 200005, "<|header_end|>": 200006, "<|eom|>": 200007, "<|eot|>": 200008,
            "<|image_start|>": 200080, "<|image_end|>": 200081, "<|tile_x_separator|>": 200084,
            "<|tile_y_separator|>": 200085, "<|image|>": 200090, "<|patch|>": 200092}
    assert {name: tok.token_id(name) for name in spec} == spec
    with pytest.raises(TokenizerError, match="no special token named '<|eot_id|>'"):
        tok.token_id("<|eot_id|>")


@pytest.mark.parametrize("name", CORPUS)
def test_encode_matches_meta(tok, meta, name):
    text = CORPUS[name]
    for bos, eos in [(False, False), (True, False), (True, True)]:
        assert tok.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)


def test_all_twelve_languages_are_covered(tok):
    assert len(SENTENCES) == 12
    # Each sentence is real text in its script: mostly multi-character tokens, nothing unknown.
    for name, text in SENTENCES.items():
        ids = tok.encode(text)
        assert len(ids) < len(text.encode()) / 1.5, name
        assert not any(tok.is_special(i) for i in ids)


@pytest.mark.parametrize("name", LONG)
def test_long_inputs_match_meta(tok, meta, name):
    text = LONG[name]
    assert list(split_like_meta(text)) == _meta_pieces(type(meta), text)
    assert tok.encode(text, bos=True) == meta.encode(text, bos=True, eos=False)


def test_long_run_cuts_change_ids(tok, meta):
    # Proof that the long-input tests can fail: without Meta's cuts these inputs give other ids.
    for name in ("nonspace_run_30k", "run_across_window"):
        text = LONG[name]
        assert meta.model.encode_ordinary(text) != meta.encode(text, bos=False, eos=False), name
    assert len(list(split_like_meta("y" * 75_001))) == 4


def test_regex_whitespace_is_str_isspace():
    # split_like_meta finds runs with `\s`; Meta's loop uses str.isspace(). They must agree everywhere.
    space = re.compile(r"\s")
    assert [c for c in range(sys.maxunicode + 1) if chr(c).isspace() != bool(space.match(chr(c)))] == []


def test_lookalikes_stay_text(tok):
    text = CORPUS["lookalikes"]
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode("<|eot|>") != [tok.eot_id]


# ---- decode and streaming -------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CORPUS if n != "surrogates"])
def test_decode_round_trip(tok, name):
    assert tok.decode(tok.encode(CORPUS[name])) == CORPUS[name]


def test_decode_matches_meta_on_random_ids(tok, meta):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert tok.decode(ids) == meta.decode(ids)  # includes half characters (U+FFFD) and special names
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


def test_decode_skip_special(tok):
    ids = [tok.bos_id, *tok.encode("Bonjour"), tok.eot_id]
    assert tok.decode(ids) == "<|begin_of_text|>Bonjour<|eot|>"
    assert tok.decode(ids, skip_special=True) == "Bonjour"
    stream = StreamDecoder(tok, skip_special=True)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "Bonjour"


def test_stream_decoder_never_splits_a_character(tok):
    text = CORPUS["emoji"] + SENTENCES["chinese"] + SENTENCES["hindi"] + SENTENCES["korean"] + "🦙"
    ids = tok.encode(text)
    # One token alone is often half a character: a naive per-token decode would show U+FFFD.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text
    assert "" in pieces  # some tokens completed nothing and were held back


def test_stream_decoder_equals_decode_on_any_ids(tok):
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(200_000) for _ in range(rng.randrange(1, 40))]
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids)
    stream = StreamDecoder(tok)
    first_half = tok.encode("🦙")[:1]
    assert stream.push(first_half[0]) == ""
    assert stream.flush() == tok.decode(first_half)  # an unfinished character ends as U+FFFD, like decode
    assert stream.push(tok.encode("ok")[0]) == "ok"  # and flush leaves the decoder ready again


# ---- tokenizer.json backend -----------------------------------------------------------------


def test_hf_json_matches_tiktoken(tok, hf_tok):
    assert hf_tok.vocab_size == tok.vocab_size
    assert dict(hf_tok.special_tokens) == dict(tok.special_tokens)
    assert hf_tok.stop_ids == tok.stop_ids and hf_tok.pad_id == tok.pad_id
    for name, text in {**CORPUS, **LONG}.items():
        assert hf_tok.encode(text) == tok.encode(text), name
    rng = random.Random(2)
    ids = [rng.randrange(tok.vocab_size) for _ in range(500)]
    assert hf_tok.decode(ids) == tok.decode(ids)
    assert all(hf_tok.token_bytes(i) == tok.token_bytes(i) for i in range(0, tok.vocab_size, 97))


def test_hf_json_ignores_its_bos_template_and_special_lookalikes(hf_tok):
    ids = hf_tok.encode("<|eot|> hi")
    assert ids[0] != hf_tok.bos_id and hf_tok.eot_id not in ids
    assert hf_tok.encode("hi", bos=True)[0] == hf_tok.bos_id


# ---- files, folders and errors --------------------------------------------------------------


def test_from_folder_choices(tmp_path, tok):
    import json

    tiny_json = tmp_path / "tiny.json"
    tiny_json.write_text(json.dumps(_tiny_hf_spec()))
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.model").symlink_to(tok.path)
    (both / "tokenizer.json").symlink_to(tiny_json)
    assert Tokenizer.from_folder(both, 202_048).path == both / "tokenizer.model"
    json_only = tmp_path / "json_only"
    json_only.mkdir()
    (json_only / "tokenizer.json").symlink_to(tiny_json)
    chosen = Tokenizer.from_folder(str(json_only), 202_048)  # the folder's file wins over the bundled one
    assert chosen.path == json_only / "tokenizer.json" and chosen.vocab_size == 26 + 2048
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Tokenizer.from_folder(empty, 202_048).path == tok.path  # the bundled one
    with pytest.raises(TokenizerError, match=f"{re.escape(str(empty))}.*vocab_size 1000"):
        Tokenizer.from_folder(empty, 1000)


def test_bundled_does_not_import_llama_models():
    code = ("import sys; from herd.tokenizer.tokenizer import Tokenizer; t = Tokenizer.bundled(); "
            "assert t.path.name == 'tokenizer.model' and t.vocab_size == 202048; "
            "assert not [m for m in sys.modules if m.startswith('llama_models')], 'imported llama_models'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("content, message", [
    ("this is not a tiktoken file\n", "line 1 is not"),
    ("YQ== 0\n@@@ 1\n", "line 2 is not"),
    ("YQ== 0\nYg== 0\n", "ranks are not"),
    ("\n\n", "no BPE ranks"),
    (b"\xff\xfe\x00garbage", "cannot read"),
])
def test_corrupt_tiktoken_file(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_tiktoken_file(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_missing_files(tmp_path):
    for load in (Tokenizer.from_tiktoken_file, Tokenizer.from_hf_json):
        with pytest.raises(TokenizerError, match="not found.*nothing.here"):
            load(tmp_path / "nothing.here")


def test_corrupt_hf_json(tmp_path, hf_json):
    import json

    path = tmp_path / "tokenizer.json"
    path.write_bytes(hf_json.read_bytes()[:5000])
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_hf_json(path)
    path.write_text(json.dumps(_tiny_hf_spec()))
    tiny = Tokenizer.from_hf_json(path)
    assert tiny.vocab_size == 26 + 2048 and tiny.encode("abc", bos=True) == [tiny.bos_id, 0, 1, 2]
    for edit, message in [
        (lambda s: s["model"].update(type="WordPiece"), "ByteLevel BPE"),
        (lambda s: s.pop("model"), "not a tokenizer.json"),
        (lambda s: s.update(added_tokens=[]), "special tokens missing: <|begin_of_text|>"),
        (lambda s: s["model"]["vocab"].pop("h"), "have no token"),
        (lambda s: s["model"]["vocab"].update({"\n": 5}), "not ByteLevel-encoded"),
        (lambda s: s["model"].update(merges=[["q", "x"]]), "cannot build"),
    ]:
        broken = _tiny_hf_spec()
        edit(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(TokenizerError, match=re.escape(message)) as err:
            Tokenizer.from_hf_json(path)
        assert str(path) in str(err.value)
