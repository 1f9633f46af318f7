"""Structured outputs: decoding constrained to a JSON schema by llguidance's grammar engine.

llguidance (Microsoft's, also under vLLM, SGLang and llama.cpp's JSON modes) compiles a schema into
a grammar and computes, before each token, the set of tokens that keep the output a valid prefix;
the others get -inf. It was chosen over xgrammar because it is one wheel with no dependencies,
where xgrammar brings Triton and TVM's FFI; both run on a CPU.

A `Constraint` belongs to one generation: `mask` the logits, sample, `advance` with the token.
Once the value is complete only the stop tokens are allowed, so a constrained reply ends as a
whole value or, cut off by ``max_tokens``, with finish reason "length".
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from herd.tokenizer.tokenizer import Tokenizer

# llguidance computes masks on a Rayon thread pool; one thread per core beside torch's own threads made
# each decode step 5x slower on 2 cores (benchmarks/structured.py). A one-thread pool, unless the user
# sets another size before herd first builds a grammar.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

MAX_SCHEMA_BYTES = 64 << 10  # a schema's JSON text
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays in a schema


class ConstraintError(ValueError):
    """A schema the engine cannot take: too large, too deep, or not a grammar it can compile."""


def _depth(value: Any, limit: int, at: int = 0) -> int:
    if at > limit:
        return at
    if isinstance(value, dict):
        return max([_depth(v, limit, at + 1) for v in value.values()], default=at)
    if isinstance(value, list):
        return max([_depth(v, limit, at + 1) for v in value], default=at)
    return at


class _Vocab:
    """What llguidance's TokenizerWrapper reads of a tokenizer: every id's bytes (special tokens as
    0xFF + name, llguidance's convention), the stop ids, and plain-text encoding."""

    def __init__(self, tok: Tokenizer, vocab_size: int):
        names = {i: n for n, i in tok.special_tokens.items()}
        self.eos_token_id, self.bos_token_id = tok.eot_id, tok.bos_id
        self.tokens = [b"\xff" + names[i].encode() if i in names else
                       tok.token_bytes(i) if i < tok.vocab_size else b"\xff<|unused|>" for i in range(vocab_size)]
        self.special_token_ids = sorted(names)
        self._encode = tok._encode_ordinary

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


@functools.lru_cache(maxsize=4)
def _lltokenizer(tok: Tokenizer, vocab_size: int):
    """llguidance's view of a tokenizer (built once: about a second for Llama 4's 202K ids)."""
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_Vocab(tok, vocab_size)), n_vocab=vocab_size,
                       eos_token=sorted(tok.stop_ids), slices=LLTokenizer.json_slices())


# A reply that is not the JSON value: text whose first character is not one a call could start with
# (herd.serve.app.may_be_tool_call reads "[", "{" and "<function=" as calls; leading space too).
_TEXT = r"/([^\[{<\s][\s\S]*)?/"


def json_grammar(schema: dict | None, tok: Tokenizer, vocab_size: int, max_bytes: int = MAX_SCHEMA_BYTES,
                 max_depth: int = MAX_SCHEMA_DEPTH, or_text: bool = False) -> str:
    """The grammar of JSON values following ``schema`` (None: any JSON object), checked: a
    ConstraintError says what is wrong. ``or_text``: that value, or text that cannot be taken for
    one (a tool call under tool_choice 'auto': the model may answer instead)."""
    from llguidance import LLMatcher

    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise ConstraintError(f"the schema must be a JSON object, got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > max_bytes:
        raise ConstraintError(f"the schema has {len(text)} bytes; the limit is {max_bytes}")
    if _depth(schema, max_depth) > max_depth:
        raise ConstraintError(f"the schema nests deeper than {max_depth} levels")
    try:  # llguidance reports bad schemas in several exception types
        if or_text:  # compact JSON as below, set in the schema itself inside a grammar
            compact = json.dumps({"x-guidance": {"whitespace_flexible": False}, **schema})
            grammar = LLMatcher.grammar_from_lark(f"start: value | text\nvalue: %json {compact}\ntext: {_TEXT}\n")
        else:
            grammar = LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        error = LLMatcher.validate_grammar(grammar, _lltokenizer(tok, vocab_size))
    except Exception as e:  # noqa: BLE001
        raise ConstraintError(f"the schema is not valid JSON Schema ({type(e).__name__}: {e})") from None
    if error:
        raise ConstraintError(f"the schema cannot be compiled: {error}")
    return grammar


class Constraint:
    """One generation's grammar state: which tokens may come next."""

    def __init__(self, grammar: str, tok: Tokenizer, vocab_size: int):
        from llguidance import LLMatcher

        self._matcher = LLMatcher(_lltokenizer(tok, vocab_size), grammar)
        self.vocab_size = vocab_size

    def _allowed(self) -> torch.Tensor:
        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        return ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:self.vocab_size].bool()

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar forbids at -inf."""
        allowed = self._allowed()
        if self._matcher.is_error() or not bool(allowed.any()):
            raise ConstraintError(f"the grammar allows no next token ({self._matcher.get_error() or 'dead end'})")
        return logits_V.masked_fill(~allowed[:logits_V.numel()], float("-inf"))

    def complete(self, stop_ids) -> bool:
        """Whether the value is whole and nothing but a stop token may follow: the reply is over
        (it ends as if the model had chosen the stop token, a step earlier)."""
        if self._matcher.is_stopped():
            return True
        if not self._matcher.is_accepting():
            return False
        allowed = self._allowed().nonzero().flatten().tolist()
        return bool(allowed) and set(allowed) <= set(stop_ids)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"token {token} breaks the grammar ({self._matcher.get_error()})")
