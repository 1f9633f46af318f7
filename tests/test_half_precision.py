"""Half-precision products on the CPU (herd.model.layers.linear): one row by a matrix-vector product
(oneDNN's on CPUs with AMX, torch's GEMV on the others), more rows by oneDNN or in float32. Every way gives
float32 sums rounded to bf16, so results agree up to one bf16 rounding step (they may sum in
another order)."""

import pytest
import torch

import herd
from herd.engine.generate import Engine
from herd.llm import init_weights
from herd.model import layers
from herd.model.layers import linear
from herd.model.transformer import TextModel
from tests.conftest import tiny_text

PROMPT = "The quick brown fox jumps over the lazy dog, then sleeps in the warm afternoon sun."


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()  # bf16 has 8 bits: one rounding step is 0.4-0.8%


# The one-row product's kernels this CPU can take: torch's GEMV everywhere, oneDNN's where it has AMX.
GEMV_KERNELS = ["torch"] + (["onednn"] if layers.amx_bf16() else [])


@pytest.mark.parametrize("kernel", GEMV_KERNELS)
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (96,)])
def test_one_row_is_the_float32_sum_rounded_once(shape, kernel, monkeypatch):
    monkeypatch.setattr(layers, "amx_bf16", lambda: kernel == "onednn")
    monkeypatch.setattr(layers, "_ONEDNN_GEMV_MIN", 0)  # this small weight takes oneDNN too
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g).bfloat16()
    b = torch.randn(300, generator=g).bfloat16()
    x = torch.randn(shape, generator=g).bfloat16()
    exact = x.float() @ w.float().t()
    for bias, want in ((None, exact), (b, exact.bfloat16().float() + b.float())):
        y = linear(x, w, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 300)
        # at most one bf16 step (2^-7 relative) from the exact product: the sums may round either way
        assert ((y.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
    assert torch._C._get_mkldnn_enabled()  # the GEMV's switch is put back


def test_one_row_by_a_small_weight_takes_torchs_gemv_even_with_amx(monkeypatch):
    """With AMX, oneDNN's one-row product costs ~20 us per call before it reads anything: weights
    below _ONEDNN_GEMV_MIN elements (routers, narrow K/V projections) take torch's GEMV, larger ones oneDNN's."""
    monkeypatch.setattr(layers, "amx_bf16", lambda: True)
    taken = []
    real = layers._half_gemv
    monkeypatch.setattr(layers, "_half_gemv", lambda *a: taken.append(a[1].shape) or real(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, generator=g).bfloat16()
    small = torch.randn(16, 96, generator=g).bfloat16()
    large = torch.randn(layers._ONEDNN_GEMV_MIN // 96 + 1, 96, generator=g).bfloat16()
    assert linear(x, small).shape == (1, 16) and linear(x, large).shape == (1, large.shape[0])
    assert taken == [small.shape]


@pytest.mark.parametrize("rows", [2, 8, 128, 129])
def test_few_rows_take_the_weight_on_the_left_only_with_amx(rows, monkeypatch):
    """On a CPU with AMX, up to 128 bf16 rows are multiplied as w @ x.T (oneDNN reads the weight as it
    lies): float32 sums rounded once, as the plain product's; elsewhere, and past 128 rows, never."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 96, generator=g).bfloat16(), torch.randn(rows, 96, generator=g).bfloat16()
    taken = []
    real = layers._weight_left
    monkeypatch.setattr(layers, "_weight_left", lambda *a: taken.append(True) or real(*a))
    y = linear(x, w)
    assert bool(taken) == (layers.amx_bf16() and rows <= 128) and y.shape == (rows, 300)
    if taken:
        exact = x.double() @ w.double().t()
        assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()
        assert torch.equal(y, torch.nn.functional.linear(x, w))  # the same sums as x @ w.T by oneDNN


def test_batch_one_decode_agrees_with_the_full_forward():
    """Decode steps of one row (one-row products) against the full forward over the same tokens (many
    rows: oneDNN's GEMMs, or the float32 upcast), and a batch of two rows decoding the same tokens."""
    model = init_weights(TextModel(tiny_text(vocab_size=256)), seed=3).eval().to(torch.bfloat16)
    ids = list(range(1, 40))
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]  # (T, V)
        one, two = Engine(model, rows=1, max_len=48), Engine(model, rows=2, max_len=48)
        one.prefill(0, ids[:-6])
        two.prefill_rows(0, [(ids[:-6], None, None)] * 2)
        for i, t in enumerate(ids[-6:-1]):
            pos = len(ids) - 6 + i
            _close(one.decode([t])[0], full[pos])
            pair = two.decode([t, t])
            _close(pair[0], full[pos])
            _close(pair[1], full[pos])


def test_compiled_head_gives_float32_sums_of_the_bf16_weights():
    """herd.load(..., compile=True): batch-1 output products by a compiled kernel, float32 sums of the
    exact bf16 products (closer to float32 than the bf16-rounded logits of the plain product); more rows go the usual way."""
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


def test_gemv_switch_does_not_reach_products_on_other_threads(monkeypatch):
    """The one-row GEMV by torch's kernel turns oneDNN off process-wide for its call; a bf16 GEMM on
    another thread under ONEDNN_SWITCH (as the server's image encoder runs) must still give oneDNN's
    bits, every time."""
    import threading

    from herd.model.layers import ONEDNN_SWITCH, _half_gemv

    monkeypatch.setattr(layers, "amx_bf16", lambda: False)  # the switching kernel, whatever this CPU has

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(2048, 512, generator=g).bfloat16(), torch.randn(512, generator=g).bfloat16()
    w2, x2 = torch.randn(256, 512, generator=g).bfloat16(), torch.randn(64, 512, generator=g).bfloat16()
    want = torch.nn.functional.linear(x2, w2)  # with oneDNN as configured
    stop, seen = threading.Event(), []

    def decode():
        while not stop.is_set():
            _half_gemv(x, w, None)

    t = threading.Thread(target=decode)
    t.start()
    try:
        for _ in range(300):
            with ONEDNN_SWITCH:
                seen.append(torch.equal(torch.nn.functional.linear(x2, w2), want))
    finally:
        stop.set()
        t.join()
    assert all(seen) and torch._C._get_mkldnn_enabled()
