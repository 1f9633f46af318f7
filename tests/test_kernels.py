"""herd.kernels against the reference model: every fast path, and the paths chosen by CPU features
forced on whatever CPU runs the tests (they use torch ops any CPU executes). Only the CUDA
grouped GEMM needs hardware this suite may lack (benchmarks/gpu.py checks it on a GPU)."""

import threading

import pytest
import torch
import torch.nn.functional as F

import herd
from herd import kernels
from herd.engine.generate import Engine, full_forward_tokens
from herd.kernels import cpu
from herd.kernels.attention import attend_one
from herd.kernels.moe import few, grouped, grouped_gemm_ok
from herd.model.init import init_weights
from herd.model.attention import Attention
from herd.model.moe import MoE
from herd.model.transformer import TextModel
from tests.conftest import tiny_text

PROMPT = "The quick brown fox jumps over the lazy dog, then sleeps in the warm afternoon sun. " * 2
HALF = (torch.bfloat16, torch.float16)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-2) -> None:
    assert (a.float() - b.float()).abs().max() <= rel * b.float().abs().max()  # bf16: one step is 0.4-0.8%


def _force_cpu(monkeypatch, amx: bool, native: bool) -> None:
    """Make the kernels believe this CPU has (or lacks) AMX and half-precision dot products."""
    monkeypatch.setattr(cpu, "amx_bf16", lambda: amx)
    monkeypatch.setattr(cpu, "native_half_gemm", lambda dtype: native)


def _within_one_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """y is x @ w.T (+ b) rounded to y's dtype once (the bias may be added before or after rounding)."""
    step = 2 ** -7 if y.dtype == torch.bfloat16 else 2 ** -10

    def ulp(t: torch.Tensor) -> torch.Tensor:  # one step of y's dtype at t's magnitude
        return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(1e-30)))) * step

    product = x.double() @ w.double().t()
    exact, bound = product, ulp(product)
    if b is not None:
        exact = product + b.double()
        bound = torch.maximum(bound, ulp(exact)) + ulp(exact)
    summing = 2 ** -18 * (x.double().abs() @ w.double().abs().t())  # float32 sums' own error, cancellation
    assert ((y.double() - exact).abs() <= bound + summing).all()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("amx, native, rows, weight_rows, way", [
    (False, False, 1, 300, "gemv"),
    (False, False, 8, 300, "plain"),
    (False, False, 16, 300, "upcast"),
    (False, False, 40, 9000, "upcast"),  # a tall weight: upcast block by block
    (False, True, 16, 300, "plain"),
    (True, True, 1, 300, "gemv"),  # a small weight: torch's GEMV even with AMX
    (True, True, 1, 6000, "weight_left"),  # 6000 x 96 > ONEDNN_GEMV_MIN / 96 rows
    (True, True, 8, 300, "weight_left"),
    (True, True, 128, 300, "weight_left"),
    (True, True, 129, 300, "plain"),
])
def test_every_cpu_product_route_is_the_exact_sum_rounded_once(amx, native, rows, weight_rows, way, dtype,
                                                                 monkeypatch):
    """Each route `cpu.linear` takes, forced by faking the CPU's features, gives the float32 sums of
    the products rounded once, as F.linear does (AMX's route is bf16 only: fp16 takes the others)."""
    _force_cpu(monkeypatch, amx, native)
    monkeypatch.setattr(cpu, "ONEDNN_GEMV_MIN", 500 * 96)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(weight_rows, 96, generator=g).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    b = torch.randn(weight_rows, generator=g).to(dtype)
    want = way if dtype == torch.bfloat16 or way != "weight_left" else ("gemv" if rows == 1 else "plain")
    assert cpu.route(rows, w) == want
    for bias in (None, b):
        y = cpu.linear(x, w, bias)
        assert y.dtype == dtype and y.shape == (rows, weight_rows)
        _within_one_rounding(y, x, w, bias)
    assert torch._C._get_mkldnn_enabled()  # the GEMV's switch is put back


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (96,)])
def test_one_row_keeps_its_leading_shape(shape):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 96, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16()
    for fn in (cpu.half_gemv, cpu.weight_left):
        y = fn(x, w, None)
        assert y.shape == (*shape[:-1], 300)
        _within_one_rounding(y.reshape(1, -1), x.reshape(1, -1), w)


def test_weight_left_gives_the_plain_products_bits():
    """w @ x.T transposed back: the same sums as x @ w.T, bit for bit, for a few rows."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 96, generator=g).bfloat16(), torch.randn(8, 96, generator=g).bfloat16()
    assert torch.equal(cpu.weight_left(x, w, None), F.linear(x, w))


def test_float32_products_are_the_plain_ones_and_cuda_never_routed():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 96, generator=g), torch.randn(1, 96, generator=g)
    assert cpu.route(1, w) == "plain" and torch.equal(cpu.linear(x, w), F.linear(x, w))


def _models(name: str = "tiny-moe", dtype: str = "float32", **kw):
    fast = herd.load(name, dtype=dtype, progress=False, **kw)
    plain = herd.load(name, dtype=dtype, progress=False, kernels=False, **kw)
    return fast, plain


def test_kernels_false_is_the_reference_model():
    """kernels=False: every module is herd.model's own class, the head row-major, the KV cache in the
    weights' dtype; kernels=True swaps classes but not one parameter, name or value."""
    fast, plain = _models("tiny-moe", "bfloat16")
    assert not [m for m in plain.model.modules() if type(m).__module__.startswith("herd.kernels")]
    assert plain.kv_dtype == torch.bfloat16 and fast.kv_dtype == kernels.cache_dtype(torch.bfloat16, "cpu")
    swapped = {type(m).__name__ for m in fast.model.modules() if type(m).__module__.startswith("herd.kernels")}
    assert swapped == {"CPULinear", "CPUExperts", "FastAttention", "FastMoE", "CPURMSNorm"}
    assert fast.model.state_dict().keys() == plain.model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.model.state_dict().values(), plain.model.state_dict().values()))
    kernels.remove(fast.model)
    assert [type(m) for m in fast.model.modules()] == [type(m) for m in plain.model.modules()]
    with pytest.raises(ValueError, match="compile=True is a kernel"):
        herd.load("tiny-moe", progress=False, kernels=False, compile=True)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-interleaved", "tiny-dense"])
def test_fast_and_reference_models_agree_in_float32(name):
    """Full forwards over 5 attention chunks (temperature tuning active past position 4), and cached
    greedy generation, with and without kernels, in float32: the same numbers up to summation order."""
    fast, plain = _models(name)
    ids = fast.tokenizer.encode(PROMPT, bos=True)
    assert len(ids) > 4 * fast.config.text.attention_chunk_size
    a, b = fast.logits([ids]), plain.logits([ids])
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert fast.model.output.weight.stride() == (1, fast.config.text.vocab_size)  # column-major head
    new = fast.generate(ids, max_new_tokens=12).token_ids
    assert new == plain.generate(ids, max_new_tokens=12).token_ids
    assert new == full_forward_tokens(plain.model, ids, 12, plain.tokenizer.stop_ids)


@pytest.mark.parametrize("amx, native", [(False, False), (False, True), (True, True)])
def test_fast_and_reference_models_agree_in_bf16_on_every_kind_of_cpu(amx, native, monkeypatch):
    """bf16 weights with the kernels of an AVX2 CPU, an AVX512-BF16 one and an AMX one (forced): the
    full forward, a prefill and batch-1 and batch-2 decode steps agree with the reference model's
    full forward within bf16 rounding, and the cache takes that CPU's dtype."""
    _force_cpu(monkeypatch, amx, native)
    fast, plain = _models("tiny-moe", "bfloat16")
    assert fast.kv_dtype == (torch.bfloat16 if amx else torch.float32)
    ids = fast.tokenizer.encode(PROMPT, bos=True)
    with torch.inference_mode():
        full = plain.model(torch.tensor([ids]))[0]  # (T, V)
        _close(fast.model(torch.tensor([ids]))[0], full)
        one = Engine(fast.model, rows=1, max_len=len(ids), kv_dtype=fast.kv_dtype)
        two = Engine(fast.model, rows=2, max_len=len(ids), kv_dtype=fast.kv_dtype)
        _close(one.prefill(0, ids[:-6]), full[-7])
        two.prefill_rows(0, [(ids[:-6], None, None)] * 2)
        for pos in range(len(ids) - 6, len(ids) - 1):
            _close(one.decode([ids[pos]])[0], full[pos])
            for row in two.decode([ids[pos]] * 2):
                _close(row, full[pos])


@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
def test_one_query_attention_over_a_half_precision_cache_keeps_float32_scores(kv, monkeypatch):
    """Decode past 1024 keys in all takes `attend_one` over a float32 cache on a CPU, but never over a
    bf16 one, whose scores it would round to bf16 before the softmax: there torch's fused kernel runs
    (float32 scores, as transformers' attention). Both agree with the full forward."""
    model = init_weights(TextModel(tiny_text(vocab_size=256)), seed=5).eval().to(torch.bfloat16)
    kernels.apply(model)
    ids = [(7 * i) % 256 for i in range(600)]
    taken = []
    import herd.kernels.attention as fast_attention
    real = fast_attention.attend_one
    monkeypatch.setattr(fast_attention, "attend_one", lambda *a: taken.append(True) or real(*a))
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
        engine = Engine(model, rows=2, max_len=len(ids), kv_dtype=kv)
        engine.prefill_rows(0, [(ids[:-3], None, None)] * 2)
        for pos in range(len(ids) - 3, len(ids) - 1):
            pair = engine.decode([ids[pos]] * 2)  # 2 rows x ~600 keys in the global layers
            for row in pair:
                _close(row, full[pos])
    assert bool(taken) == (kv == torch.float32)


def test_attend_one_is_scaled_dot_product_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16, generator=g), torch.randn(3, 2, 50, 16, generator=g), torch.randn(3, 2, 50, 16, generator=g)
    mask = (torch.arange(50)[None] < torch.tensor([50, 20, 1])[:, None])[:, None, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (attend_one(q, k, v, mask) - want).abs().max() <= 1e-6
    attn = Attention(tiny_text(), 0)
    assert (attn.attend_cached(q, k, v, mask) - want).abs().max() == 0  # the reference path is SDPA itself


@pytest.mark.parametrize("tokens, top_k", [(1, 1), (2, 2), (4, 1), (3, 2)])
def test_few_pairs_equal_dispatch_and_the_dense_reference(tokens, top_k):
    """Decode's few (token, expert) pairs, each through its own expert, against the sorted dispatch and
    Meta's every-token-through-every-expert oracle."""
    from herd.config import MoEConfig

    torch.manual_seed(tokens)
    moe = init_weights(MoE(32, MoEConfig(num_experts=4, top_k=top_k, expert_dim=48)), seed=tokens)
    x = torch.randn(tokens, 32)
    ids, scores = moe.route(x)
    ref = moe.routed(x, ids, scores)
    assert (few(moe, x, ids, scores) - ref).abs().max() <= 1e-6
    assert (moe._dense(x, ids, scores) - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() or not grouped_gemm_ok(torch.zeros(1, dtype=torch.bfloat16, device="cuda")),
                    reason="the grouped GEMM needs a CUDA GPU of compute capability 9.0+ (benchmarks/gpu.py checks it)")
def test_grouped_gemm_equals_dispatch_on_cuda():
    from herd.config import MoEConfig

    moe = init_weights(MoE(64, MoEConfig(num_experts=8, top_k=2, expert_dim=128)), seed=0).cuda().bfloat16()
    x = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    ids, scores = moe.route(x)
    _close(grouped(moe, x, ids, scores), moe.routed(x, ids, scores))


@pytest.mark.slow  # torch.compile builds a C++ kernel
def test_compiled_head_gives_float32_sums_of_the_bf16_weights():
    """compile=True: batch-1 output products by a compiled kernel, float32 sums of the exact bf16
    products (closer to float32 than the bf16-rounded logits of the plain product); more rows go the
    usual way."""
    llm = herd.load("tiny-moe", dtype="bfloat16", progress=False, compile=True)
    model = llm.model
    assert type(model.output) is kernels.CompiledHead and not model.output.weight.is_mkldnn
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    with torch.inference_mode():
        h = model.hidden(torch.tensor([ids]))
        exact = model.norm(h).float() @ model.output.weight.float().t()  # [1, T, V]
        one = model.head(h[:, -1:])
        rows = model.head(h)  # T rows: the CPU product
    assert one.dtype == torch.float32 and one.shape == (1, 1, model.cfg.vocab_size)
    assert (one[0, 0] - exact[0, -1]).abs().max() <= 1e-5 * exact[0, -1].abs().max()
    assert torch.equal(rows, cpu.linear(model.norm(h), model.output.weight).float())
    assert len(llm.generate(ids, max_new_tokens=4).token_ids) == 4
    assert not kernels.compile_head(herd.load("tiny-moe", progress=False).model)  # float32: nothing to gain


def test_cache_dtype_follows_the_cpu():
    for amx, want in ((True, torch.bfloat16), (False, torch.float32)):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(cpu, "amx_bf16", lambda: amx)
            assert kernels.cache_dtype(torch.bfloat16, "cpu") == want
            assert kernels.cache_dtype(torch.float16, "cpu") == torch.float32
            assert kernels.cache_dtype(torch.float32, "cpu") == torch.float32
            assert kernels.cache_dtype(torch.bfloat16, "meta") == torch.bfloat16


def test_gemv_switch_does_not_reach_products_on_other_threads():
    """The one-row GEMV turns oneDNN off process-wide for its call; a bf16 GEMM on another thread under
    ONEDNN_SWITCH (as the image encoder runs once kernels are applied) must still give oneDNN's bits,
    every time."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(2048, 512, generator=g).bfloat16(), torch.randn(512, generator=g).bfloat16()
    w2, x2 = torch.randn(256, 512, generator=g).bfloat16(), torch.randn(64, 512, generator=g).bfloat16()
    want = F.linear(x2, w2)  # with oneDNN as configured
    stop, seen = threading.Event(), []

    def decode():
        while not stop.is_set():
            cpu.half_gemv(x, w, None)

    t = threading.Thread(target=decode)
    t.start()
    try:
        for _ in range(300):
            with cpu.ONEDNN_SWITCH:
                seen.append(torch.equal(F.linear(x2, w2), want))
    finally:
        stop.set()
        t.join()
    assert all(seen) and torch._C._get_mkldnn_enabled()


def test_the_image_encoder_holds_the_onednn_switch():
    """With kernels, the vision encoder runs under ONEDNN_SWITCH; its features equal the reference's."""
    fast, plain = _models("tiny-moe")
    assert type(fast.vision) is kernels.SerialVision and type(plain.vision) is not kernels.SerialVision
    S = fast.config.vision.image_size
    pixels = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    held = []
    real = plain.vision.__class__.forward

    def spy(self, *a):
        held.append(cpu.ONEDNN_SWITCH._is_owned())
        return real(self, *a)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(plain.vision.__class__, "forward", spy)
        assert torch.equal(fast.image_features(pixels), plain.image_features(pixels))
    assert held == [True, False]


@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 1, 8, 128), (7, 5, 96), (3, 100), (80, 200)])
def test_native_rms_norm_gives_the_references_bits(shape):
    """The one-call norm (native.c) of bf16 rows, with and without a weight, for widths with a tail and
    enough rows to be threaded, is bitwise the reference's float32 norm cast back and scaled; the
    modules use it, and it leaves float32 and gradients to the reference."""
    from herd.kernels import native
    from herd.model.layers import RMSNorm, rms_norm

    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    w = torch.randn(shape[-1], generator=g).bfloat16()
    if not native._ready():
        assert native.rms_norm(x, w, 1e-5) is None
        return
    assert torch.equal(native.rms_norm(x, None, 1e-5), rms_norm(x, 1e-5))
    assert torch.equal(native.rms_norm(x, w, 1e-5), rms_norm(x, 1e-5) * w)
    norm = RMSNorm(shape[-1], 1e-5).bfloat16()
    norm.weight.data = w
    fast = kernels.CPURMSNorm(shape[-1], 1e-5).bfloat16()
    fast.weight.data = w
    with torch.inference_mode():
        assert torch.equal(fast(x), norm(x))
    assert native.rms_norm(x.float(), None, 1e-5) is None
    assert native.rms_norm(x.requires_grad_(), None, 1e-5) is None
