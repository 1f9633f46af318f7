"""Llama 4's tokenizer: byte-level BPE over 200,000 ranks plus 2,048 special tokens at 200000..202047.

Two file formats give the same ids:
  - Meta's ``tokenizer.model``: one ``<base64 bytes> <rank>`` line per token, run by tiktoken;
  - Hugging Face's ``tokenizer.json``: a ByteLevel BPE run by the ``tokenizers`` library.
Either way the Tokenizer keeps one table ``id -> bytes`` (specials included), so decoding and
streaming are one code path whatever the backend.

Encoding never turns text into special ids: a user typing "<|eot|>" gets the tokens of those
seven characters. Special ids enter a sequence only through the chat format (or ``token_id``).

Ground truth: llama_models/llama4/tokenizer.py (llama-models 0.3.0).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from herd.vocab import LLAMA4_VOCAB_SIZE, NUM_SPECIAL, llama4_special_tokens  # noqa: F401  (NUM_SPECIAL re-exported)

# Meta's O200K-style pre-tokenizer pattern, character for character (Tokenizer.O200K_PATTERN):
# the regex decides the BPE pieces, so any change here changes ids.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta encodes long text in windows of 400k characters (tiktoken panicked on longer input) and
# cuts any run of more than 25k whitespace or non-whitespace characters every 25k characters
# (tiktoken issue #195: quadratic time). The cuts change the BPE pieces, so they change the ids:
# we cut at exactly the same places to stay identical.
WINDOW_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# `\s` in Python's `re` is exactly str.isspace(), which is what Meta's loop tests (checked over all
# code points in tests/test_tokenizer.py); runs longer than MAX_RUN_CHARS are the only ones cut.
# The lookbehinds let a match start only where a run starts; without them a run just short of
# the limit is rescanned from each of its characters (quadratic: seconds for one 25k run).
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))

_REQUIRED = ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
             "<|finetune_right_pad|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or not a Llama 4 tokenizer; the message names the file."""


def split_like_meta(text: str) -> Iterator[str]:
    """Cut text where Meta's reference cuts it before BPE: 400k-char windows, runs cut every 25k."""
    for start in range(0, len(text), WINDOW_CHARS):
        window = text[start:start + WINDOW_CHARS]
        cut = 0
        if len(window) > MAX_RUN_CHARS:
            for run in _LONG_RUN.finditer(window):
                # Meta's counter restarts at 1 on the cut character, so cuts fall every 25k chars of the run.
                for pos in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                    yield window[cut:pos]
                    cut = pos
        yield window[cut:]


class Tokenizer:
    """Llama 4 text <-> token ids; build it with from_tiktoken_file, from_hf_json, bundled or from_folder."""

    def __init__(self, encode_ordinary: Callable[[str], list[int]], token_bytes: Sequence[bytes],
                 special_tokens: Mapping[str, int], path: Path | None):
        self._encode_ordinary = encode_ordinary  # BPE of plain text; never produces special ids
        self._token_bytes = list(token_bytes)
        self.special_tokens: Mapping[str, int] = MappingProxyType(dict(special_tokens))
        self._special_ids = frozenset(self.special_tokens.values())
        self.path = path
        where = path or "tokenizer"
        missing = [n for n in _REQUIRED if n not in self.special_tokens]
        if missing:
            raise TokenizerError(f"{where}: not a Llama 4 tokenizer, special tokens missing: {', '.join(missing)}")
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot|>"]
        self.eom_id = self.special_tokens["<|eom|>"]
        # Meta's pad id; it is a real token (id 200018), so masks, not the id, must mark padding.
        self.pad_id = self.special_tokens["<|finetune_right_pad|>"]
        # Generation ends on any of these (Meta's Tokenizer.stop_tokens): end of text, of message, of turn.
        self.stop_ids = frozenset((self.eos_id, self.eom_id, self.eot_id))

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Meta's tokenizer.model (base64 token, rank per line); specials follow at ids len(ranks)..+2047."""
        import tiktoken

        path = Path(path)
        ranks = _read_ranks(path)
        specials = {name: len(ranks) + i for i, name in enumerate(llama4_special_tokens())}
        try:
            # Specials stay out of tiktoken: we never want it to find them in text.
            enc = tiktoken.Encoding(name=path.name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
        except Exception as e:  # tiktoken raises plain ValueError/pyo3 errors on inconsistent ranks
            raise TokenizerError(f"{path}: tiktoken rejected the ranks ({e})") from None
        table = sorted(ranks, key=ranks.__getitem__) + [name.encode() for name in specials]
        return cls(enc.encode_ordinary, table, specials, path)

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face tokenizer.json (ByteLevel BPE); special tokens are read from its added_tokens."""
        import tokenizers

        path = Path(path)
        spec = _read_json(path)
        try:
            model, added = spec["model"], spec.get("added_tokens") or []
            if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
                raise TokenizerError(f"{path}: expected a ByteLevel BPE tokenizer, got model "
                                     f"{model.get('type')!r} with decoder {(spec.get('decoder') or {}).get('type')!r}")
            specials = {t["content"]: int(t["id"]) for t in added}
            vocab: dict[str, int] = model["vocab"]
        except (KeyError, TypeError, AttributeError) as e:
            raise TokenizerError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})") from None
        table = _byte_level_table(path, vocab, specials)
        # An encoder without added tokens or post-processor: text can never become a special id
        # (and BOS is ours to add), whatever flags the file sets.
        plain = dict(spec, added_tokens=[], post_processor=None, truncation=None, padding=None)
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(plain))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # tokenizers raises Exception or (Rust panics) pyo3's PanicException
            raise TokenizerError(f"{path}: the tokenizers library cannot build it ({e})") from None

        def encode_ordinary(text: str) -> list[int]:
            try:
                return backend.encode(text, add_special_tokens=False).ids
            except TypeError:  # tokenizers' answer to a str it cannot turn into UTF-8
                # Lone surrogates: fix them up exactly as tiktoken does before encoding (pairs joined,
                # strays become U+FFFD), per piece as in Meta's loop.
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                return backend.encode(text, add_special_tokens=False).ids

        return cls(encode_ordinary, table, specials, path)

    @classmethod
    def bundled(cls) -> Tokenizer:
        """The real Llama 4 tokenizer.model shipped inside the installed llama-models package."""
        return _bundled()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, vocab_size: int) -> Tokenizer:
        """A checkpoint folder's tokenizer.model, else tokenizer.json, else (vocab 202048 only) the bundled one."""
        folder = Path(folder)
        if (folder / "tokenizer.model").is_file():
            return cls.from_tiktoken_file(folder / "tokenizer.model")
        if (folder / "tokenizer.json").is_file():
            return cls.from_hf_json(folder / "tokenizer.json")
        if vocab_size == LLAMA4_VOCAB_SIZE:
            return cls.bundled()
        raise TokenizerError(f"{folder}: no tokenizer.model or tokenizer.json, and vocab_size {vocab_size} is not "
                             f"Llama 4's {LLAMA4_VOCAB_SIZE}, so the bundled Llama 4 tokenizer cannot stand in")

    # ---- encode / decode ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (202048 for Llama 4)."""
        return len(self._token_bytes)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids, identical to Meta's Tokenizer.encode(text, bos=bos, eos=eos); look-alikes stay text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for piece in split_like_meta(text):
            ids += self._encode_ordinary(piece)
        if eos:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's bytes are its name)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is outside this tokenizer's [0, {len(self._token_bytes)})")
        return self._token_bytes[token_id]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Ids -> text (bytes joined, invalid UTF-8 replaced by U+FFFD, as Meta's decode does)."""
        if skip_special:
            ids = [i for i in ids if int(i) not in self._special_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        """Whether an id is one of the special tokens."""
        return int(token_id) in self._special_ids

    def token_id(self, name: str) -> int:
        """The id of a special token by name, e.g. token_id('<|eot|>') == 200008."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"{self.path or 'tokenizer'}: no special token named {name!r}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Decodes ids one at a time, returning only whole characters; pieces joined equal decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        # The incremental UTF-8 decoder holds back an unfinished multi-byte character until its
        # last byte arrives, and replaces invalid bytes exactly as a one-shot decode would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text completed by it (often '', e.g. mid-emoji)."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """End of stream: whatever bytes are still pending, as U+FFFD if they never completed."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---- file readers -----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e})") from None


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            # Meta's loader warns and skips bad lines; a skipped line would shift every later id, so we stop.
            raise TokenizerError(f"{path}: line {n} is not '<base64 token> <rank>': {line[:60]!r}") from None
    if not ranks:
        raise TokenizerError(f"{path}: no BPE ranks found (empty or not a tiktoken file)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once (duplicate tokens or ranks)")
    return ranks


def _read_json(path: Path) -> dict:
    try:
        spec = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    return spec


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's ByteLevel alphabet, char -> byte: printable bytes map to themselves, the rest to 256+n."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = sorted(set(range(256)) - set(keep))
    return {chr(b): b for b in keep} | {chr(256 + n): b for n, b in enumerate(shifted)}


def _byte_level_table(path: Path, vocab: Mapping[str, int], specials: Mapping[str, int]) -> list[bytes]:
    alphabet = _byte_alphabet()
    size = max([*vocab.values(), *specials.values()], default=-1) + 1
    table: list[bytes | None] = [None] * size
    special_ids = set(specials.values())
    for text, i in vocab.items():
        if i in special_ids:
            continue
        try:
            table[i] = bytes(alphabet[c] for c in text)
        except KeyError as e:
            raise TokenizerError(f"{path}: vocab entry {text!r} (id {i}) is not ByteLevel-encoded "
                                 f"(character {e.args[0]!r})") from None
    for name, i in specials.items():
        table[i] = name.encode()
    holes = [i for i, b in enumerate(table) if b is None]
    if holes:
        raise TokenizerError(f"{path}: {len(holes)} ids in [0, {size}) have no token (first: {holes[0]})")
    return table  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _bundled() -> Tokenizer:
    # find_spec locates the package without running any of llama_models' modules.
    spec = importlib.util.find_spec("llama_models")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "llama4" / "tokenizer.model"
        if candidate.is_file():
            return Tokenizer.from_tiktoken_file(candidate)
    raise TokenizerError("the bundled Llama 4 tokenizer comes from the llama-models package "
                         "(llama_models/llama4/tokenizer.model), which is not installed: pip install llama-models")
