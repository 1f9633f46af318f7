"""bf16 weights in oneDNN's blocked layout (herd.model.packed): the plain layout's numbers, up to the
bf16 rounding of a product (the kernels may sum in another order), and plain weights on disk."""

import torch

import herd
from herd.engine.generate import Engine
from herd.llm import init_weights
from herd.model.layers import native_half_gemm
from herd.model.packed import MAX_SHARE, can_pack, pack, unpack
from herd.model.transformer import TextModel
from tests.conftest import tiny_text

PROMPT = "The quick brown fox jumps over the lazy dog, then sleeps in the warm afternoon sun."


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() <= 2e-2 * y.abs().max()  # bf16 has 8 bits: one rounding step is 0.4-0.8%


def _numbers(model, ids: list[int]) -> list[torch.Tensor]:
    """Logits of: two prompts prefilled side by side in 5-token segments (MoE prefill path), 6
    greedy batch-2 decode steps (the few-token path), and a full forward."""
    engine = Engine(model, rows=2, max_len=len(ids) + 8, prefill_chunk=5)
    out = [engine.prefill_rows(0, [(ids, None, None), (ids[:-3], None, None)])]
    for _ in range(6):
        out.append(engine.decode(out[-1].argmax(-1).tolist()))
    with torch.inference_mode():
        out.append(model(torch.tensor([ids])))
    return out


def test_packed_weights_compute_the_same_and_save_plain(tmp_path):
    llm = herd.load("tiny-moe", dtype="bfloat16", progress=False)
    model = llm.model
    if not native_half_gemm(torch.bfloat16):  # e.g. an AVX2 CPU: nothing to gain, nothing changes
        assert not can_pack(model) and pack(model) is False and not model.output.weight.is_mkldnn
        return
    # herd.load packed it: every Linear and every routed expert, but not a matrix over MAX_SHARE of
    # the weights (tiny-moe's head: the 202,048-token vocabulary at width 64 is most of the model).
    assert model.layers[0].attention.wq.weight.is_mkldnn
    assert model.layers[1].feed_forward.shared_expert.w2.weight.is_mkldnn
    total = sum(p.numel() for p in model.parameters())
    assert model.output.weight.numel() > MAX_SHARE * total and not model.output.weight.is_mkldnn
    experts = model.layers[0].feed_forward.experts
    assert experts.packed is not None and experts.w1.is_meta  # no second copy of the experts
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    packed = _numbers(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # plain tensors, unpacked on the fly
    assert not any(v.is_mkldnn or v.is_meta for v in state.values())

    unpack(model)
    assert not model.output.weight.is_mkldnn and experts.packed is None and not experts.w1.is_meta
    plain = _numbers(model, ids)
    _close(packed, plain)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    assert pack(model) and not can_pack(model)  # packing twice changes nothing
    llm.save_pretrained(tmp_path / "saved")  # from the packed model: plain weights on disk
    again = herd.load(tmp_path / "saved", dtype="bfloat16", progress=False)
    assert again.model.output.weight.is_mkldnn  # the loader packs the head first, whatever its share
    assert all(torch.equal(state[k], v) for k, v in again.model.state_dict().items())
    assert llm.generate(ids, max_new_tokens=5).token_ids == again.generate(ids, max_new_tokens=5).token_ids


def test_a_head_within_the_share_is_packed_too():
    model = init_weights(TextModel(tiny_text(vocab_size=256)), seed=3).eval().to(torch.bfloat16)
    ids = list(range(1, 40))
    plain = _numbers(model, ids)
    if not pack(model):
        assert not native_half_gemm(torch.bfloat16)
        return
    assert model.output.weight.is_mkldnn
    _close(_numbers(model, ids), plain)


def test_only_cpu_bf16_models_are_packed():
    assert not can_pack(herd.load("tiny-moe", dtype="float32", progress=False).model)
    assert not herd.load("tiny-moe", dtype="float32", progress=False).model.output.weight.is_mkldnn


def test_compiled_head_gives_float32_sums_of_the_bf16_weights():
    """herd.load(..., compile=True): batch-1 output products by a compiled kernel, float32 sums of the
    exact bf16 products (closer to float32 than oneDNN's bf16-rounded logits); more rows go the usual way."""
    llm = herd.load("tiny-moe", dtype="bfloat16", progress=False, compile=True)
    model = llm.model
    assert model.head_gemv is not None and not model.output.weight.is_mkldnn  # the head stays plain
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    with torch.inference_mode():
        h = model.decode_layers(model.embed(torch.tensor([ids])))
        exact = model.norm(h).float() @ model.output.weight.float().t()  # [1, T, V]
        one = model.head(h[:, -1:])
        rows = model.head(h)  # T rows: the plain product
    assert one.dtype == torch.float32 and one.shape == (1, 1, model.cfg.vocab_size)
    assert (one[0, 0] - exact[0, -1]).abs().max() <= 1e-5 * exact[0, -1].abs().max()
    assert torch.equal(rows, model.output(model.norm(h)).float())
    assert len(llm.generate(ids, max_new_tokens=4).token_ids) == 4
    assert not herd.load("tiny-moe", progress=False).model.compile_head()  # float32: nothing to gain
