"""Training data: tokenise once to memory-mapped files, then pack documents into fixed-length rows.

Tokenising streams over the sources (a file is never read whole), appending to ``tokens.bin``
(uint32) and ``mask.bin`` (uint8: 1 where the token is one the model learns to predict — every
token for pretraining, the assistant's tokens for chat fine-tuning) with document offsets; the
result is reused while the sources and tokenizer are unchanged. Packing is a pure function of
(documents, seq_len, seed, epoch): documents in a seeded order, each cut into pieces of at most
``seq_len`` tokens (consecutive pieces share one token, so every token but a document's first is a
target exactly once), laid greedily into rows. Inside a row every piece is its own document for
attention (segment ids, positions from 0: see `herd.model.attention.packing`). Because the
rows of step s are a function of s, the data position of a checkpoint is just its step.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from herd.tokenizer.chat_format import ChatTokenizer
from herd.train.loss import IGNORE_INDEX as IGNORE  # targets that are not learned

_READ_BYTES = 1 << 20


class DataError(ValueError):
    """A training file cannot be read or a record in it is malformed (the message names file and line)."""


# ---- sources -> documents ---------------------------------------------------------------------


def _text_documents(path: Path, separator: str) -> Iterator[tuple[str, str]]:
    """(where, text) per document of a .txt file, read in blocks (files may exceed memory)."""
    with open(path, encoding="utf-8", errors="strict") as f:
        rest, n = "", 0
        while True:
            try:
                block = f.read(_READ_BYTES)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not block:
                break
            rest += block
            if separator:
                *docs, rest = rest.split(separator)
                for d in docs:
                    if d.strip():
                        n += 1
                        yield f"{path}: document {n}", d
            elif len(rest) > _READ_BYTES:  # one document per file: hand it on in newline-cut pieces
                cut = rest.rfind("\n") + 1 or len(rest)
                yield f"{path}", rest[:cut]
                rest = rest[cut:]
        if rest.strip():
            yield f"{path}: document {n + 1}" if separator else f"{path}", rest


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict, int]]:
    """(where, record, its line's size in bytes) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{i}", rec, len(line.encode())


def expand_sources(patterns: list[str], key: str) -> list[Path]:
    """Files named by paths or glob patterns, sorted within each pattern; missing ones are errors."""
    files: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        matches = sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else [p]
        if not matches or not all(m.is_file() for m in matches):
            raise DataError(f"{key}: {pat} matches no file")
        bad = [m for m in matches if m.suffix not in (".txt", ".jsonl")]
        if bad:
            raise DataError(f"{key}: {bad[0]} is neither .txt nor .jsonl")
        files += matches
    return files


@dataclass
class Encoded:
    ids: list[int]
    learn: list[bool]  # per token: is it a target
    images: list[str]  # image sources of the document, in order (chat data only)


class Encoder:
    """Turns one record into token ids and a learn-mask. A JSONL record with ``messages`` is a chat
    (only the assistant's tokens are learned); one with the text field is raw text (every token
    is learned); one file may mix both, in any job."""

    def __init__(self, tokenizer, text_field: str = "text"):
        self.tok = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer.of(tokenizer)
        self.text_field = text_field

    def text(self, text: str, first: bool = True, last: bool = True) -> Encoded:
        ids = self.tok.encode(text, bos=first, eos=last)
        return Encoded(ids, [True] * len(ids), [])

    def record(self, where: str, rec: dict, folder: Path) -> Encoded:
        if "messages" not in rec:
            text = rec.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(f"{where}: expected a 'messages' list or a string field {self.text_field!r}")
            return self.text(text)
        messages = rec["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected a non-empty 'messages' list")
        images: list[str] = []
        messages = [_localise_images(m, folder, images) for m in messages]
        try:
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=False, tools=rec.get("tools"))
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: {e}") from None
        if not any(ids.assistant_mask):
            raise DataError(f"{where}: no assistant message, nothing to learn")
        return Encoded(list(ids.ids), list(ids.assistant_mask), images)


def _localise_images(message: Any, folder: Path, images: list[str]) -> Any:
    """Image parts with relative paths made absolute (against the JSONL's folder); sources recorded."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            src = part.get("image") if part["type"] == "image" else (part.get("image_url") or {}).get("url")
            if isinstance(src, str) and not src.startswith(("data:", "http:", "https:", "file:")) \
                    and not Path(src).is_absolute():
                src = str(folder / src)
            part = {"type": "image", "image": src}
            images.append(src)
        parts.append(part)
    return {**message, "content": parts}


# ---- tokenised documents on disk ----------------------------------------------------------------


class Documents:
    """Tokenised documents, memory-mapped: ``doc(i)`` -> (ids, learn-mask, image sources)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.offsets = np.load(folder / "offsets.npy")
        n = int(self.offsets[-1])
        self.tokens = np.memmap(folder / "tokens.bin", dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0)
        self.mask = np.memmap(folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0)
        images = folder / "images.json"
        self.images: dict[str, list[str]] = json.loads(images.read_text()) if images.exists() else {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def span(self, i: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        a = int(self.offsets[i]) + start
        return self.tokens[a:a + n], self.mask[a:a + n]

    def doc_images(self, i: int) -> list[str]:
        return self.images.get(str(i), [])


def _fingerprint(files: list[Path], tokenizer, separator: str, text_field: str) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    tok = tokenizer.path.stat() if tokenizer.path is not None else None  # a rebuilt tokenizer re-tokenises
    tiler = tokenizer.image_processor  # images become tiles x tokens per tile <|patch|> tokens
    tiling = tiler and (tiler.tile_size, tiler.max_tiles, tiler.tokens_per_tile)
    h.update(f"{tokenizer.path}|{tok and (tok.st_size, tok.st_mtime_ns)}|{tokenizer.vocab_size}|{separator!r}|"
             f"{text_field}|{tiling}".encode())
    return h.hexdigest()[:16]


def tokenise(files: list[Path], folder: Path, encoder: Encoder, separator: str, progress: bool = True) -> Documents:
    """Tokenise the files into ``folder`` (written under a temporary name, renamed when complete;
    an existing complete folder with the same fingerprint is reused)."""
    stamp = _fingerprint(files, encoder.tok, separator, encoder.text_field)
    if (folder / "done.json").exists() and json.loads((folder / "done.json").read_text()).get("stamp") == stamp:
        return Documents(folder)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    offsets, images = [0], {}
    total = sum(f.stat().st_size for f in files)
    bar = _bar(total, f"tokenising {folder.name}", progress)
    with open(tmp / "tokens.bin", "wb") as tf, open(tmp / "mask.bin", "wb") as mf:
        def put(enc: Encoded, extend: bool = False):
            if extend:  # continuation of the previous document (a huge one-document file)
                offsets[-1] += len(enc.ids)
            else:
                offsets.append(offsets[-1] + len(enc.ids))
                if enc.images:
                    images[str(len(offsets) - 2)] = enc.images
            tf.write(np.asarray(enc.ids, dtype=np.uint32).tobytes())
            mf.write(np.asarray(enc.learn, dtype=np.uint8).tobytes())

        for f in files:
            if f.suffix == ".txt":
                last_where = None
                for where, text in _text_documents(f, separator):
                    cont = not separator and where == last_where
                    if cont:  # a piece of the same file-long document: no BOS again, EOS added at its end below
                        put(encoder.text(text, first=False, last=False), extend=True)
                    else:
                        put(encoder.text(text, first=True, last=bool(separator)))
                    last_where = where
                    bar.update(len(text.encode()))
                if not separator and last_where is not None:
                    eos = encoder.tok.encode("", eos=True)
                    put(Encoded(eos, [True] * len(eos), []), extend=True)
            else:
                for where, rec, size in _jsonl_records(f):
                    put(encoder.record(where, rec, f.parent))
                    bar.update(size)
    bar.close()
    if len(offsets) == 1:
        raise DataError(f"{', '.join(map(str, files))}: no documents found")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "images.json").write_text(json.dumps(images))
    (tmp / "done.json").write_text(json.dumps({"stamp": stamp, "documents": len(offsets) - 1,
                                               "tokens": offsets[-1]}))
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    os.replace(tmp, folder)
    return Documents(folder)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


# ---- packing ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Rows of one epoch: row r holds segments seg_ptr[r]:seg_ptr[r+1] of (doc, start, length)."""

    seg_ptr: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.seg_ptr) - 1

    def segments(self, r: int) -> list[tuple[int, int, int]]:
        a, b = self.seg_ptr[r], self.seg_ptr[r + 1]
        return list(zip(self.doc[a:b].tolist(), self.start[a:b].tolist(), self.length[a:b].tolist()))


def pack(lengths: np.ndarray, docs: np.ndarray, seq_len: int, order_seed: int | None,
         unsplittable: set[int] = frozenset(), where=lambda d: f"document {d}", open_rows: int = 64) -> Plan:
    """Best-fit packing of the given documents (in a seeded order, or as given when order_seed is None).

    Each piece goes to the open row with the least room that still fits it, or opens a new row; at
    most ``open_rows`` rows stay open (the fullest is closed first), so memory stays bounded and
    rows come out roughly in document order. Deterministic for a given order.
    """
    if order_seed is not None:
        docs = docs[np.random.default_rng(order_seed).permutation(len(docs))]
    rows: list[list[tuple[int, int, int]]] = []  # closed rows, in closing order
    open_: list[tuple[int, list[tuple[int, int, int]]]] = []  # (room, pieces)

    def place(piece: tuple[int, int, int]):
        k = piece[2]
        best = min((i for i, (room, _) in enumerate(open_) if room >= k), key=lambda i: open_[i][0], default=None)
        if best is None:
            if len(open_) == open_rows:
                i = min(range(len(open_)), key=lambda i: open_[i][0])
                rows.append(open_.pop(i)[1])
            open_.append((seq_len, []))
            best = len(open_) - 1
        room, pieces = open_[best]
        pieces.append(piece)
        open_[best] = (room - k, pieces)
        if room - k == 0:
            rows.append(open_.pop(best)[1])

    for d in docs.tolist():
        n = int(lengths[d])
        if n < 2:
            continue  # nothing to predict
        if n > seq_len and d in unsplittable:
            raise DataError(f"{where(d)}: {n} tokens with images cannot be split; raise data.seq_len above {n}")
        s = 0
        while s + 1 < n:
            k = min(seq_len, n - s)
            place((d, s, k))
            s += k - 1  # the next piece starts on this one's last token: it becomes that piece's input
    rows += [pieces for _, pieces in open_]
    flat = [p for r in rows for p in r]
    seg_ptr = np.cumsum([0] + [len(r) for r in rows])
    arr = np.asarray(flat, dtype=np.int64).reshape(-1, 3)
    return Plan(seg_ptr, arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy())


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] int64
    targets: torch.Tensor  # [B, L] int64, IGNORE where nothing is learned
    segments: torch.Tensor  # [B, L] document index inside the row, -1 for padding
    positions: torch.Tensor  # [B, L] position inside the document
    images: list[str]  # image sources of the rows, in row-major order of their <|patch|> tokens

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


class PackedData:
    """Rows of packed documents, indexed globally across epochs (epoch k reshuffles with seed + k)."""

    def __init__(self, docs: Documents, doc_ids: np.ndarray, seq_len: int, seed: int | None):
        self.docs, self.doc_ids, self.seq_len, self.seed = docs, doc_ids, seq_len, seed
        self._plans: dict[int, Plan] = {}
        self.unsplittable = {int(k) for k in docs.images}
        self.rows_per_epoch = len(self.plan(0))
        if self.rows_per_epoch == 0:
            raise DataError(f"{docs.folder}: no document has 2 or more tokens")

    def plan(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            self._plans = {epoch: pack(self.docs.lengths(), self.doc_ids, self.seq_len,
                                       None if self.seed is None else self.seed + epoch, self.unsplittable)}
        return self._plans[epoch]

    def row(self, k: int) -> list[tuple[int, int, int]]:
        epoch, r = divmod(k, self.rows_per_epoch)
        return self.plan(epoch).segments(r)

    def batch(self, rows: list[int]) -> Batch:
        L = self.seq_len
        tokens = np.zeros((len(rows), L), dtype=np.int64)
        targets = np.full((len(rows), L), IGNORE, dtype=np.int64)
        segments = np.full((len(rows), L), -1, dtype=np.int64)
        positions = np.zeros((len(rows), L), dtype=np.int64)
        images: list[str] = []
        for b, k in enumerate(rows):
            at = 0
            for j, (d, s, n) in enumerate(self.row(k)):
                ids, learn = self.docs.span(d, s, n)
                tokens[b, at:at + n] = ids
                tgt = ids[1:].astype(np.int64)
                targets[b, at:at + n - 1] = np.where(learn[1:] > 0, tgt, IGNORE)
                segments[b, at:at + n] = j
                positions[b, at:at + n] = np.arange(n)
                images += self.docs.doc_images(d)
                at += n
        return Batch(*(torch.from_numpy(a) for a in (tokens, targets, segments, positions)), images)

    def count_targets(self, rows: list[int]) -> int:
        """Targets in these rows, without building them (each rank knows the whole step's count)."""
        total = 0
        for k in rows:
            for d, s, n in self.row(k):
                total += int((self.docs.span(d, s + 1, n - 1)[1] > 0).sum())
        return total


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): a seeded share of documents, at least one each when there are two."""
    if val_fraction == 0:
        return np.arange(n_docs), np.zeros(0, dtype=np.int64)
    if n_docs < 2:
        raise DataError(f"a held-out split needs 2 or more documents, found {n_docs}; give data.val files, "
                        f"set data.doc_separator, or data.val_fraction = 0")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_docs)
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
