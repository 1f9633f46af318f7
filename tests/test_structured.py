"""Structured outputs (herd.engine.constrain): replies constrained to a JSON schema by llguidance,
from Python and through the server, mixed in batches with free requests, streamed and not."""

import json
import threading

import jsonschema
import pytest

import herd
from herd.engine.constrain import ConstraintError, json_grammar

STRING = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": STRING, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1,
                                                                           "maximum": 9}, "maxItems": 4}},
     "required": ["color", "sizes"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}, "label": STRING},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                      "ok": {"type": "boolean"}}, "required": ["code", "ok"],
     "additionalProperties": False},
    {"type": "array", "items": {"enum": ["fox", "dog", "cat"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"shapes": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"kind": {"enum": ["circle", "square", "triangle"]},
                                         "count": {"type": "integer", "minimum": 0, "maximum": 5}},
        "required": ["kind", "count"], "additionalProperties": False}}, "note": {"type": ["string", "null"],
                                                                                 "maxLength": 12}},
     "required": ["shapes", "note"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def tiny_llm():
    return herd.load("herd-tiny", progress=False)


@pytest.mark.parametrize("schema", [s if i == 5 else pytest.param(s, marks=pytest.mark.slow)
                                    for i, s in enumerate(SCHEMAS)], ids=range(len(SCHEMAS)))
def test_generate_follows_the_schema(tiny_llm, schema):
    """Greedy replies of herd-tiny end by themselves, parse and validate; sampled ones do whenever they
    end, and otherwise are cut at max_new_tokens and said to be (a sampled number may run on: JSON
    bounds no digits)."""
    for kw in (dict(), dict(temperature=1.0, seed=3)):
        g = tiny_llm.generate([{"role": "user", "content": "Describe the picture as JSON."}], max_new_tokens=120,
                              json_schema=schema, **kw)
        if kw and g.stop_reason == "length":
            assert len(g.token_ids) == 120 and g.text[:1] in ("{", "["), g.text
            continue
        assert g.stop_reason == "stop", (g.text, g.stop_reason)
        jsonschema.validate(json.loads(g.text), schema)


def test_any_json_object_and_a_cut_off_reply(tiny_llm):
    g = tiny_llm.generate("Once upon a time", max_new_tokens=40, json_schema=True, temperature=1.0, seed=0)
    if g.stop_reason == "stop":
        assert isinstance(json.loads(g.text), dict)
    else:
        assert g.stop_reason == "length" and g.text.startswith("{")
    cut = tiny_llm.generate("x", max_new_tokens=3, json_schema=SCHEMAS[0])
    assert cut.stop_reason == "length" and cut.text.startswith("{")  # a prefix of valid JSON, said to be cut


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"a": {"type": "wat"}}}, "cannot be compiled: Invalid type: wat"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)}},
     "bytes; the limit is 65536"),
    (json.loads('{"type": "array", "items": ' * 40 + '{}' + '}' * 40), "nests deeper than 32 levels"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_schemas_are_refused(tiny_llm, schema, message):
    with pytest.raises(ConstraintError, match=message):
        json_grammar(schema, tiny_llm.tokenizer, tiny_llm.config.text.vocab_size)
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate("Hi", json_schema=schema)


@pytest.mark.slow  # a server, 60 requests
def test_sixty_requests_mixed_with_free_ones_all_parse(tmp_path):
    """60 constrained requests over the schemas above (chat and completions, streamed and not) beside
    30 free ones, sent at once to a server batching 8: every reply that ends by itself validates."""
    from tests.test_serve import Server

    server = Server("herd-tiny", tmp_path, "--max-batch", "8", "--max-queue", "128")
    try:
        c = server.client(timeout=600)
        results, errors = [], []

        def one(i: int) -> None:
            try:
                schema = SCHEMAS[i % len(SCHEMAS)] if i < 60 else None
                fmt = ({"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
                       if i % 4 else {"type": "json_object"}) if schema is not None else None
                if i % 4 == 0 and schema is not None:
                    schema = {"type": "object"}
                extra = {} if fmt is None else {"response_format": fmt}
                msgs = [{"role": "user", "content": f"Tell me about shape number {i} as JSON."}]
                if i % 5 == 4:  # the legacy completions route
                    r = c.completions.create(model="herd-tiny", prompt=f"JSON {i}:", max_tokens=150,
                                             temperature=0.7, seed=i, extra_body=extra)
                    results.append((schema, r.choices[0].text, r.choices[0].finish_reason))
                elif i % 2:
                    parts, finish = [], None
                    for chunk in c.chat.completions.create(model="herd-tiny", messages=msgs, max_tokens=150,
                                                           temperature=0.7, seed=i, stream=True, extra_body=extra):
                        if chunk.choices:
                            parts.append(chunk.choices[0].delta.content or "")
                            finish = chunk.choices[0].finish_reason or finish
                    results.append((schema, "".join(parts), finish))
                else:
                    r = c.chat.completions.create(model="herd-tiny", messages=msgs, max_tokens=150,
                                                  temperature=0.7, seed=i, extra_body=extra)
                    results.append((schema, r.choices[0].message.content, r.choices[0].finish_reason))
            except Exception as e:  # noqa: BLE001 - reported below with the request's number
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(90)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        constrained = [(s, text, f) for s, text, f in results if s is not None]
        assert len(constrained) == 60
        done = [(s, text) for s, text, f in constrained if f == "stop"]
        assert all(f in ("stop", "length") for _, _, f in constrained)
        for schema, text in done:
            jsonschema.validate(json.loads(text), schema)
        print(f"{len(done)} of 60 constrained replies ended by themselves; e.g. {done[0][1]!r}")
        assert len(done) >= 45, f"only {len(done)} of 60 constrained replies ended by themselves"
    finally:
        server.stop()
