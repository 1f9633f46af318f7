"""The cached engine against full forwards and transformers' generate; the generation API and its errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import herd
from herd.config import PRESETS
from herd import kernels
from herd.engine.cache import full_cache_bytes, kv_cache_bytes
from herd.engine.generate import Engine, full_forward_tokens

from tests.conftest import tiny_text

PROMPT = "The llama is a domesticated South American camelid. " * 3  # ~40 tokens: 5 chunks of 8


@pytest.fixture(scope="module")
def moe():
    return herd.load("tiny-moe")


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-interleaved", "tiny-dense"])
@pytest.mark.parametrize("prefill_chunk", [512, 3])
def test_cached_greedy_equals_full_forwards(name, prefill_chunk):
    llm = herd.load(name, seed=7)
    llm.prefill_chunk = prefill_chunk  # 3: segments that end mid-chunk and at chunk boundaries
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    out = llm.generate(ids, max_new_tokens=30)
    assert (len(ids) + 30) // 8 - len(ids) // 8 >= 3  # the generation crosses >= 3 chunk boundaries
    assert out.token_ids == full_forward_tokens(llm.model, ids, 30, llm.tokenizer.stop_ids)


def test_greedy_equals_transformers_generate(write_hf):
    cfg = tiny_text("tiny-interleaved")
    folder, ref = write_hf(cfg, seed=21)
    llm = herd.load(folder, progress=False)
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    ref.config.use_cache = True
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, use_cache=True,
                              eos_token_id=None, pad_token_id=0, min_new_tokens=30)[0, len(ids):].tolist()
    ours = llm.generate(ids, max_new_tokens=30)
    stop = next((i for i, t in enumerate(ours.token_ids) if t in llm.tokenizer.stop_ids), None)
    assert ours.token_ids == theirs[:len(ours.token_ids)] and (stop is None or stop == len(ours.token_ids) - 1)


def test_batch_of_different_lengths_equals_one_by_one(moe):
    prompts = ["Hi", PROMPT, [{"role": "user", "content": "Tell me about llamas."}]]
    batch = moe.generate(prompts, max_new_tokens=12)
    for p, b in zip(prompts, batch):
        assert moe.generate(p, max_new_tokens=12).token_ids == b.token_ids


@pytest.mark.parametrize("prefill_chunk", [512, 5])
def test_prompts_prefilled_side_by_side_equal_one_by_one(moe, prefill_chunk):
    """Engine.prefill_rows (llm.generate's batches, the server's admissions): prompts of different
    lengths over several attention chunks, with images in some, get the logits and the cache their
    own prefill gives; 5: segments of 1-2 positions for 3-4 rows, ending mid-chunk."""
    from PIL import Image

    picture = lambda color: {"type": "image", "image": Image.new("RGB", (90, 60), color)}  # noqa: E731
    chats = [[{"role": "user", "content": [picture("red"), {"type": "text", "text": "What is this?"}]}],
             PROMPT, "Hi there",
             [{"role": "user", "content": [picture("blue"), {"type": "text", "text": "And this?"}, picture("green")]}]]
    prompts = sorted((moe.prepare(c) for c in chats), key=lambda p: -len(p.ids))
    assert len({len(p.ids) for p in prompts}) == 4 and len(prompts[0].ids) > 3 * 8  # 8: tiny-moe's chunk
    moe.prefill_chunk = prefill_chunk
    try:
        together = Engine(moe.model, rows=4, max_len=200, prefill_chunk=prefill_chunk)
        alone = Engine(moe.model, rows=1, max_len=200, prefill_chunk=prefill_chunk)
        first = together.prefill_rows(0, [(p.ids, p.image_mask, p.image_features) for p in prompts])
        for i, p in enumerate(prompts):
            torch.testing.assert_close(first[i], alone.prefill(0, p.ids, p.image_mask, p.image_features),
                                       rtol=1e-5, atol=1e-5)
        step = together.decode([int(x) for x in first.argmax(-1)])  # reads what the prefill cached
        for i, p in enumerate(prompts):
            alone.prefill(0, p.ids, p.image_mask, p.image_features)
            torch.testing.assert_close(step[i], alone.decode([int(first[i].argmax())])[0], rtol=1e-5, atol=1e-5)
        batch = moe.generate(chats, max_new_tokens=12)
        for c, b in zip(chats, batch):
            assert moe.generate(c, max_new_tokens=12).token_ids == b.token_ids
    finally:
        moe.prefill_chunk = None
    with pytest.raises(ValueError, match="longest first"):
        together.prefill_rows(0, [(p.ids, None, None) for p in prompts[::-1]])


def test_seeded_sampling_is_reproducible(moe):
    a = moe.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=3)
    b = moe.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=3)
    c = moe.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-38, 1e-7])
def test_vanishing_temperatures_are_greedy(moe, temperature):
    """Near 0 (subnormal in float32, or 0 once cast) logits / temperature used to overflow into NaN
    and torch.multinomial raised."""
    greedy = moe.generate(PROMPT, max_new_tokens=8)
    assert moe.generate(PROMPT, max_new_tokens=8, temperature=temperature, seed=1).token_ids == greedy.token_ids


def test_vanishing_top_p_keeps_the_most_likely_token(moe):
    greedy = moe.generate(PROMPT, max_new_tokens=8)
    assert moe.generate(PROMPT, max_new_tokens=8, temperature=1.0, top_p=1e-300, seed=1).token_ids == greedy.token_ids


def test_one_rows_failure_ends_that_row_only(moe, monkeypatch):
    """Six sequences decode together; one of them fails while its 4th token is sampled. It ends with
    an error; the other five produce exactly what they produce when nothing fails."""
    from herd.engine import batch
    from herd.engine.batch import Batcher, Job
    from herd.engine.generate import Sampling

    ids = moe.tokenizer.encode(PROMPT, bos=True)

    def run() -> list[Job]:
        engine = Engine(moe.model, rows=6, max_len=len(ids) + 12)
        batcher = Batcher(engine, moe.tokenizer)
        jobs = [Job(ids, 12, Sampling(temperature=0.8, seed=i)) for i in range(6)]
        batcher.add(*jobs)
        while batcher.seats:
            batcher.step()
        return jobs

    clean = run()
    real, calls = batch.sample, {}

    def failing(logits, s, gen):
        calls[s.seed] = calls.get(s.seed, 0) + 1
        if s.seed == 3 and calls[s.seed] == 4:
            raise RuntimeError("injected")
        return real(logits, s, gen)

    monkeypatch.setattr(batch, "sample", failing)
    hurt = run()
    assert hurt[3].stop_reason == "error" and "injected" in hurt[3].error and len(hurt[3].token_ids) == 3
    for i in (0, 1, 2, 4, 5):
        assert hurt[i].stop_reason == "length" and hurt[i].token_ids == clean[i].token_ids
        assert hurt[i].text == clean[i].text
    assert len({tuple(j.token_ids) for j in clean}) > 1  # the rows differ: each really ran its own


def test_stream_equals_generate_and_stop_strings(moe):
    full = moe.generate(PROMPT, max_new_tokens=24, temperature=0.7, seed=5)
    pieces = list(moe.stream(PROMPT, max_new_tokens=24, temperature=0.7, seed=5))
    assert "".join(pieces) == full.text and full.stop_reason == "length" and len(full.token_ids) == 24
    stop = full.text[5:8]
    cut = moe.generate(PROMPT, max_new_tokens=24, temperature=0.7, seed=5, stop=[stop])
    assert cut.stop_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert "".join(moe.stream(PROMPT, max_new_tokens=24, temperature=0.7, seed=5, stop=[stop])) == cut.text


def test_stop_takes_one_string_as_openai_does_and_token_ids_keep_what_was_generated(moe):
    full = moe.generate(PROMPT, max_new_tokens=24, temperature=0.7, seed=5)
    stop = full.text[5:8]
    one = moe.generate(PROMPT, max_new_tokens=24, temperature=0.7, seed=5, stop=stop)
    listed = moe.generate(PROMPT, max_new_tokens=24, temperature=0.7, seed=5, stop=[stop])
    assert (one.text, one.token_ids, one.stop_reason) == (listed.text, listed.token_ids, "stop")
    # text ends before the stop string; token_ids hold every token generated, the stop string's too.
    assert one.text == full.text[:full.text.index(stop)]
    assert stop in moe.tokenizer.decode(one.token_ids) and one.token_ids == full.token_ids[:len(one.token_ids)]


def test_tools_and_chat_ids_with_images_from_python(moe):
    """llm.generate had no tools=, and refused the image-carrying ids apply_chat_template returns."""
    from PIL import Image

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), (200, 0, 0))},
                                             {"type": "text", "text": "Weather where this was taken?"}]}]
    ids = moe.tokenizer.apply_chat_template(messages, tools=tools)
    assert ids.pixel_values is not None
    by_ids = moe.generate(ids, max_new_tokens=6)
    by_messages = moe.generate(messages, max_new_tokens=6, tools=tools)
    assert by_ids.token_ids == by_messages.token_ids and by_ids.prompt_tokens == len(ids.ids)
    assert by_messages.token_ids != moe.generate(messages, max_new_tokens=6).token_ids or \
        len(moe.tokenizer.apply_chat_template(messages).ids) < len(ids.ids)  # the tools were offered
    with pytest.raises(ValueError, match="tools are offered in chat messages"):
        moe.generate("plain text", tools=tools)
    with pytest.raises(ValueError, match="remote URLs are not fetched"):
        moe.generate([{"role": "user", "content": [{"type": "image", "image": "http://example.com/a.png"}]}])


def test_stop_token_ends_generation(moe):
    """Force <|eot|> to be the greedy choice: generation stops on it and leaves it out of the text."""
    eot = moe.tokenizer.eot_id
    with torch.no_grad():
        saved = moe.model.output.weight[eot].clone()
        moe.model.output.weight[eot] = moe.model.norm.weight * 50
    try:
        out = moe.generate("Hello", max_new_tokens=10)
    finally:
        with torch.no_grad():
            moe.model.output.weight[eot] = saved
    assert out.token_ids == [eot] and out.stop_reason == "stop" and out.text == ""


def test_images_in_chat_prompts_reach_the_model(moe):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (90, 60), "red")},
                                             {"type": "text", "text": "What is this?"}]}]
    out = moe.generate(messages, max_new_tokens=5)
    ids = moe.tokenizer.apply_chat_template(messages)
    first = int(moe.logits([ids.ids], pixel_values=ids.pixel_values)[0, -1].argmax())
    assert out.token_ids[0] == first


def test_kv_cache_accounting():
    scout = PRESETS["scout"].text
    ratio = kv_cache_bytes(scout, 1 << 20) / full_cache_bytes(scout, 1 << 20)
    assert ratio <= 0.3  # 12 global layers keep 1M entries, 36 chunked ones keep 8192
    llm = herd.load("tiny-moe")
    assert llm.kv_cache_bytes(100) == kv_cache_bytes(llm.config.text, 100, 1, torch.float32)
    from herd.engine.cache import KVCache

    assert KVCache(llm.config.text, 2, 100, torch.float32, "cpu").nbytes == llm.kv_cache_bytes(100, batch=2)


def test_half_precision_cache(monkeypatch):
    """herd.load's KV cache dtype follows herd.kernels.cache_dtype (float32 for bf16 weights on a CPU
    without AMX, bf16 with it), either on request; both agree with the full forward."""
    llm = herd.load("tiny-moe", dtype="bfloat16")
    default = kernels.cache_dtype(torch.bfloat16, "cpu")
    assert llm.kv_dtype == default
    # Rotary tables stay exact whatever dtype the weights are cast to.
    assert llm.model.inv_freq.dtype == torch.float32 and llm.vision.rope.dtype == torch.complex64
    assert llm.kv_cache_bytes(100) == kv_cache_bytes(llm.config.text, 100, 1, default)
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    exact = herd.load("tiny-moe").model(torch.tensor([ids]))[0, -1]  # same weights in float32
    gap = lambda logits: float((logits - exact).abs().max() / exact.abs().max())  # noqa: E731
    assert gap(llm.model(torch.tensor([ids]))[0, -1]) < 3e-2  # bf16 full forward: ~0.7-1% here
    for kv in (torch.float32, torch.bfloat16):
        engine = Engine(llm.model, rows=1, max_len=len(ids), prefill_chunk=5, kv_dtype=kv)
        assert engine.cache.k[0].dtype == kv
        assert gap(engine.prefill(0, ids)) < 3e-2, kv  # the same bf16 rounding, nothing more
    llm.kv_dtype = torch.bfloat16
    assert llm.kv_cache_bytes(100) * 2 == kv_cache_bytes(llm.config.text, 100, 1, torch.float32)
    assert len(llm.generate(ids, max_new_tokens=4).token_ids) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1), "temperature must be"),
    (dict(top_k=-2), "top_k must be"),
    (dict(min_p=1.0), "min_p must be"),
    (dict(stop=[""]), "stop must be a non-empty string or a list of them"),
    (dict(stop=5), "stop must be a non-empty string or a list of them"),
])
def test_bad_options(moe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        moe.generate("Hi", **kwargs)


def test_unknown_option_and_bad_prompts(moe):
    with pytest.raises(TypeError, match="frobnicate"):
        moe.generate("Hi", frobnicate=1.0)
    for prompt in ("", [], None):
        with pytest.raises(ValueError, match="empty|prompt must be"):
            moe.generate(prompt)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        moe.generate([1, 2, 10**9])


def test_context_limit():
    short = herd.load("tiny-moe")
    short.config = dataclasses.replace(short.config, text=dataclasses.replace(short.config.text, max_seq_len=32))
    short.model.cfg = short.config.text
    with pytest.raises(ValueError, match=r"prompt 0: \d+ tokens \+ max_new_tokens 30 exceeds the model's context of 32"):
        short.generate(PROMPT, max_new_tokens=30)


# ---- penalties and logit bias --------------------------------------------------------------------


def test_penalties_and_bias_adjust_the_logits_as_specified():
    """OpenAI's presence / frequency penalties over the output, then the bias; the repetition penalty
    over prompt and output exactly as transformers' RepetitionPenaltyLogitsProcessor."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from herd.engine.generate import Sampling, adjusted

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    prompt, output = [1, 2, 3], [3, 7, 7, 9]
    assert adjusted(logits, Sampling(), prompt, output) is logits  # nothing asked: untouched
    got = adjusted(logits, Sampling(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 100, 7: -1.5}),
                   prompt, output)
    want = logits.clone()
    for token, count in ((3, 1), (7, 2), (9, 1)):
        want[token] -= 0.5 + 0.25 * count
    want[4] += 100
    want[7] -= 1.5
    torch.testing.assert_close(got, want)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[None].clone())[0]
    torch.testing.assert_close(adjusted(logits, Sampling(repetition_penalty=1.3), prompt, output), theirs)


def test_logit_bias_and_penalties_steer_generation(moe):
    free = moe.generate("Hello there", max_new_tokens=6).token_ids
    forced = moe.generate("Hello there", max_new_tokens=6, logit_bias={1234: 100}).token_ids
    assert forced == [1234] * 6
    banned = moe.generate("Hello there", max_new_tokens=6, logit_bias={free[0]: -100}).token_ids
    assert banned[0] != free[0]
    fresh = moe.generate("Hello there", max_new_tokens=12, presence_penalty=2.0, frequency_penalty=2.0,
                         logit_bias={1234: 5}).token_ids  # a bias the penalties outweigh once it has been said
    assert fresh[0] == 1234 and fresh.count(1234) <= 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be in \(0, 10\]"),
    (dict(logit_bias={5: 101}), r"logit_bias maps token ids"),
    (dict(logit_bias={10**9: 1}), "logit_bias: token id 1000000000 is outside the vocabulary"),
])
def test_bad_penalties_are_named(moe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        moe.generate("Hi", **kwargs)


# ---- prompt-lookup decoding ----------------------------------------------------------------------


def test_lookup_drafts_what_followed_the_last_occurrence():
    from herd.engine.batch import lookup

    assert lookup([0, 1, 2, 3, 9, 0, 1, 2, 3], 3) == [9, 0, 1]  # the last 4 recur at 0
    assert lookup([5, 1, 2, 3, 7, 8, 0, 1, 2, 3], 2) == [7, 8]  # only the last 3 recur
    assert lookup([6, 2, 3, 7, 0, 2, 3], 2) == []  # a pair is not enough
    assert lookup([1, 2, 3, 4], 4) == [] and lookup([7], 2) == []


def _run_batch(llm, prompts, sampling, speculate, max_new=40):
    from herd.engine.batch import Batcher, Job
    from herd.engine.generate import Engine

    engine = Engine(llm.model, rows=len(prompts), max_len=200)
    batcher = Batcher(engine, llm.tokenizer, speculate)
    jobs = [Job(llm.tokenizer.encode(p, bos=True), max_new, sampling) for p in prompts]
    batcher.add(*jobs)
    while batcher.seats:
        batcher.step()
    return [j.token_ids for j in jobs], batcher


@pytest.mark.parametrize("name", ["tiny-interleaved", pytest.param("tiny-moe", marks=pytest.mark.slow)])
def test_prompt_lookup_decoding_changes_no_token(name, monkeypatch):
    """Drafts verified in one forward give the tokens plain decoding gives (greedy, seeded sampling,
    a JSON schema) for a batch of different lengths whose steps cross attention chunks. A random
    model never repeats itself, so the drafts are an oracle's: the plain run's own next tokens, with
    every third one wrong, so that drafts are kept whole, in part, and not at all."""
    import herd.engine.batch as batch
    from herd.engine.generate import Sampling

    llm = herd.load(name)
    prompts = ["the cat the cat the cat the", "a b c a b c a b", "Hello there, how are you today my friend?"]
    for sampling in (Sampling(), Sampling(temperature=0.8, seed=5), Sampling(grammar=json_grammar_for(llm))):
        plain, _ = _run_batch(llm, prompts, sampling, 0)
        starts = [llm.tokenizer.encode(p, bos=True) for p in prompts]

        def oracle(tokens, k, calls=[0]):
            row = next(i for i, s in enumerate(starts) if tokens[:len(s)] == s)
            done = len(tokens) - len(starts[row])
            calls[0] += 1
            draft = list(plain[row][done:done + k])
            if calls[0] % 3 == 0 and len(draft) > 1:
                draft[1] = (draft[1] + 1) % llm.config.text.vocab_size
            return draft

        monkeypatch.setattr(batch, "lookup", oracle)
        fast, batcher = _run_batch(llm, prompts, sampling, 4)
        monkeypatch.undo()
        assert fast == plain
        assert batcher.accepted > 20 and batcher.drafted > batcher.accepted, (batcher.drafted, batcher.accepted)
        assert sum(map(len, plain)) > 3 * 8  # several attention chunks crossed


def test_prompt_lookup_through_llm_generate():
    llm = herd.load("herd-tiny", progress=False)
    prompt = "Mia saw a big green frog near the old mill. Mia saw a big green frog near the old"
    plain = llm.generate(prompt, max_new_tokens=30).token_ids
    llm.speculate = 4
    assert llm.generate(prompt, max_new_tokens=30).token_ids == plain


def json_grammar_for(llm):
    from herd.engine.constrain import json_grammar

    return json_grammar({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}},
                        llm.tokenizer, llm.config.text.vocab_size)
