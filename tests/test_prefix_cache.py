"""Automatic prefix caching (herd.engine.prefix): a prompt that starts like an earlier one resumes
from its KV state and gives the tokens a cold prefill gives, wherever the shared prefix ends against
the attention chunks, with and without images; the cache stays within its byte budget."""

import pytest

import herd
from herd.engine.batch import Batcher, Job
from herd.engine.generate import Engine, Sampling
from herd.engine.prefix import PrefixCache

SHAPES = "examples/shapes.png"


@pytest.fixture(scope="module")
def llm():
    return herd.load("tiny-interleaved")  # float32, attention chunk 8, RoPE and NoPE layers, vision


def _run(llm, prompts, prefixes=None, max_new=12):
    """Each prompt alone, one after the other, through one Batcher (and its prefix cache)."""
    engine = Engine(llm.model, rows=2, max_len=256)
    batcher = Batcher(engine, llm.tokenizer, prefixes=prefixes)
    out = []
    for p in prompts:
        job = Job(list(p.ids), max_new, Sampling(), image_mask=p.image_mask, image_features=p.image_features)
        batcher.add(job)
        while batcher.seats:
            batcher.step()
        out.append(job.token_ids)
    return out


def _text(llm, n: int, tail: str):
    """A prompt of exactly ``n`` shared tokens, then ``tail``'s."""
    shared = (llm.tokenizer.encode("The llama walked up the hill and saw the sun " * 8, bos=True))[:n]
    return llm.prepare(shared + llm.tokenizer.encode(tail))


@pytest.mark.parametrize("n", [3, 8, 13, 16, 23, 40])  # before, at and after chunk boundaries (chunk 8)
def test_reused_prefixes_give_the_cold_tokens(llm, n):
    """Three prompts sharing their first n tokens, the third being those n alone. What a prompt may
    reuse: the shared tokens if they end in the chunk the earlier prompt ends in, else up to the
    last chunk start before them (nothing of a chunk is needed there)."""
    prompts = [_text(llm, n, " yes"), _text(llm, n, " no bird"), _text(llm, n, "")]
    cache = PrefixCache(1 << 30)
    assert _run(llm, prompts, cache) == _run(llm, prompts)
    ends = [len(p.ids) for p in prompts]
    second = n if n // 8 == ends[0] // 8 else n // 8 * 8
    third = max(n - 1 if (n - 1) // 8 == end // 8 else (n - 1) // 8 * 8 for end in ends[:2])
    assert cache.reused_tokens == second + third
    assert cache.hits == (second > 0) + (third > 0)


def test_a_prefix_ending_past_the_snapshots_chunk_resumes_at_a_chunk_start(llm):
    """The first prompt is long (its snapshot holds the chunk of position 40 in its chunked layers);
    the second shares 13 tokens: it may resume at 8 (a chunk's start), not 13."""
    long, short = _text(llm, 40, " yes"), _text(llm, 13, " no, it was the moon")
    cache = PrefixCache(1 << 30)
    assert _run(llm, [long, short], cache) == _run(llm, [long, short])
    assert cache.reused_tokens == 8


def test_images_are_part_of_the_key(llm):
    from PIL import Image

    def chat(image, question):
        return llm.prepare([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": question}]}])

    shapes = Image.open(SHAPES).convert("RGB")
    other = Image.new("RGB", shapes.size, (200, 30, 30))
    prompts = [chat(shapes, "How many shapes?"), chat(shapes, "What colour is the circle?"),
               chat(other, "What colour is the circle?")]
    cache = PrefixCache(1 << 30)
    assert _run(llm, prompts, cache) == _run(llm, prompts)
    first_image = int(prompts[2].image_mask.nonzero()[0, 0])
    # the same picture: reused past it; another picture: only what comes before the image, here
    # nothing (the earlier prompts end in a later chunk than the image's start)
    assert cache.hits == 1 and cache.reused_tokens > first_image + int(prompts[0].image_mask.sum())


def test_the_cache_stays_within_its_budget(llm):
    one = PrefixCache(1 << 30)
    _run(llm, [_text(llm, 30, " a")], one, max_new=1)
    budget = int(2.5 * one.bytes)  # room for two such prompts
    cache = PrefixCache(budget)
    prompts = [_text(llm, 30, f" number {i}") for i in range(3)]
    different = [llm.prepare(llm.tokenizer.encode(f"{i} " * 15, bos=True)) for i in range(6)]
    _run(llm, different + prompts, cache, max_new=1)
    assert cache.bytes <= budget
    assert len(cache.entries) < len(different) + len(prompts)  # some were evicted
    assert cache.hits >= 2  # the prompts sharing 30 tokens found each other among the evictions


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_snapshot_bytes_are_known_before_the_snapshot(llm, kv_dtype):
    """The prefix cache sizes a snapshot before taking it (under --tp every rank would take it)."""
    engine = Engine(llm.model, rows=1, max_len=64, kv_dtype=kv_dtype)
    engine.prefill(0, list(range(1, 30)))
    for n in (1, 7, 8, 9, 29):
        assert engine.cache.snapshot_bytes(n) == engine.snapshot(0, n).nbytes


def test_prompts_sharing_a_prefix_hold_its_blocks_once(llm):
    """Two conversations with the same 200-token system prompt: the second snapshot shares the first's
    whole blocks of it, so the cache holds about one prompt's entries, not two; evicting the first
    keeps what the second still holds."""
    system = llm.tokenizer.encode("You are a careful helper who answers briefly. " * 20, bos=True)[:200]
    prompts = [llm.prepare(system + llm.tokenizer.encode(q)) for q in (" Hi there", " What is a llama")]
    alone = PrefixCache(1 << 30)
    _run(llm, prompts[:1], alone, max_new=1)
    both = PrefixCache(1 << 30)
    assert _run(llm, prompts, both, max_new=1) == _run(llm, prompts, max_new=1)
    first, second = (e.snapshot for e in both.entries.values())
    assert second.nbytes > first.nbytes * 0.95  # each holds all its positions...
    assert both.bytes < 1.2 * alone.bytes  # ...but the shared blocks are held once
    tight = PrefixCache(int(1.2 * alone.bytes))  # room for the two together, not for two copies
    _run(llm, prompts + prompts[1:], tight, max_new=1)
    assert len(tight.entries) == 2 and tight.bytes <= tight.budget  # neither evicted
    assert tight.hits == 2  # the second prompt resumed from the first's prefix, then its repeat from itself
