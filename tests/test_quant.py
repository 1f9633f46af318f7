"""Weight-only int8 / int4 (herd.kernels.quant) against the dequantize-then-F.linear reference: each
quantized matrix and expert stack, whole models, the engine, and loading a checkpoint quantized."""

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.engine.generate import full_forward_tokens
from herd.kernels import native, quant
from herd.model.moe import Experts
from herd.model.transformer import TextModel

PROMPT = "The quick brown fox jumps over the lazy dog, then sleeps in the warm afternoon sun. " * 2
SPECS = [quant.QuantSpec("int8"), quant.QuantSpec("int4", group=32), quant.QuantSpec("int4", group=64)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("N", [16, 48, 64, 96, 208])
def test_int4_unpacking_inverts_torchs_packing(N):
    q = torch.randint(0, 16, (N, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(N))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(quant.unpack_int4(packed, N, 256).int(), q)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-g{s.group}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_its_dequantized_weight_times_x(spec, dtype):
    """Few rows (the weight-only kernels) and many (dequantize, then the dtype's GEMM) both give
    x @ dequantized(W)ᵀ; the quantization itself stays within its format's error."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    m = quant.QuantLinear(256, 96, spec, dtype, device="cpu")
    for key, value in quant._quantize_one("", spec, dtype, w).items():
        setattr(m, key, value)
    deq = m.dequantized()
    assert _rel(deq, w) < (0.01 if spec.mode == "int8" else 0.07)
    few = quant.FEW_ROWS[spec.mode]
    for rows in (1, 3, few, few + 1, 40):
        x = torch.randn(rows, 256, generator=g).to(dtype)
        y = m(x)
        assert y.dtype == dtype and y.shape == (rows, 96)
        assert _rel(y, F.linear(x.float(), deq.float())) <= 1e-2, rows
    assert m(torch.randn(2, 5, 256, generator=g).to(dtype)).shape == (2, 5, 96)


@pytest.mark.parametrize("N,K", [(96, 256), (40, 1000), (16, 64), (8, 5), (24, 56), (1100, 128), (37, 4100)])
def test_native_int8_kernel_matches_torchs(N, K):
    """herd's int8 kernels (native.c: AVX512-BF16 dot products, for a few rows and blocked for tens;
    dequantized tiles for many rows) give the sums torch's kernel gives, for widths with and without a
    tail; elsewhere herd takes torch's."""
    g = torch.Generator().manual_seed(K)
    q, scale = quant.quantize_int8(torch.randn(N, K, generator=g), torch.bfloat16)
    x = torch.randn(quant.FEW_ROWS["int8"], K, generator=g).bfloat16()
    if not torch.cpu._is_avx512_bf16_supported():
        assert not native.usable(x, scale)
        return
    assert native.usable(x, scale), "the kernel did not build: see stderr"
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    for rows in (1, 2, 3, 7, quant.FEW_ROWS["int8"]):  # the kernel takes four rows at a time
        ours = native.int8_rows(x[:rows], q, scale)
        assert ours.dtype == torch.bfloat16 and ours.shape == (rows, N)
        assert _rel(ours, exact[:rows]) <= 4e-3, rows  # the bf16 output's rounding
        if K % 16 == 0:  # torch's kernel gets other widths wrong (herd does not call it for them)
            assert _rel(ours, torch.ops.aten._weight_int8pack_mm(x[:rows], q, scale)) <= 8e-3, rows
    for rows in (1, 5, 6, 13):  # the blocked kernel: six rows of x by blocks of 16 weight rows
        ours = native.int8_gemm(x[:rows], q, scale)
        assert ours.dtype == torch.bfloat16 and ours.shape == (rows, N)
        assert _rel(ours, exact[:rows]) <= 4e-3, rows
    assert torch.equal(native.int8_dequantized(q, scale, 0, N), q.bfloat16() * scale[:, None])  # rounded alike
    assert torch.equal(native.int8_dequantized(q, scale, 3, N - 2), (q.bfloat16() * scale[:, None])[3:N - 2])
    many = torch.randn(quant.TILED_FROM["int8"], K, generator=g).bfloat16()  # tiles (wide inputs: blocked)
    assert _rel(quant.int8_linear(many, q, scale), many.double() @ (q.double() * scale.double()[:, None]).T) <= 1e-2


@pytest.mark.parametrize("N,K,group", [(64, 256, 32), (192, 512, 64), (128, 1024, 128), (64, 512, 256), (192, 8192, 128)])
def test_native_int4_kernel_matches_torchs(N, K, group):
    """herd's int4 kernel reads torch's CPU packing as it lies and gives torch's kernel's sums, for
    one row to more than its four rows at once."""
    g = torch.Generator().manual_seed(N + K)
    packed, scale_zero = quant.quantize_int4(torch.randn(N, K, generator=g), group, torch.bfloat16)
    x = torch.randn(9, K, generator=g).bfloat16()
    if not (torch.cpu._is_avx512_bf16_supported() and quant._int4_block() == 64):
        assert not native.int4_usable(x, scale_zero, quant._int4_block())
        return
    assert native.int4_usable(x, scale_zero, quant._int4_block()), "the kernels did not build: see stderr"
    exact = x.double() @ quant.dequantize_int4(packed, scale_zero, group, N, K, torch.float64).T
    for rows in (1, 2, 5, 9):
        ours = native.int4_rows(x[:rows], packed, scale_zero, group)
        theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:rows], packed, group, scale_zero)
        assert ours.dtype == torch.bfloat16 and ours.shape == (rows, N)
        assert _rel(ours, exact[:rows]) <= 4e-3 and _rel(ours, theirs) <= 8e-3, rows
    deq = quant.dequantize_int4(packed, scale_zero, group, N, K, torch.float32)
    assert _rel(native.int4_dequantized_t(packed, scale_zero, group, K).t(), deq) <= 4e-3  # rounded to bf16 once
    many = torch.randn(quant.TILED_FROM["int4"], K, generator=g).bfloat16()  # dequantized tiles, a GEMM each
    assert _rel(quant.int4_linear(many, packed, scale_zero, group), many.double() @ deq.double().T) <= 1e-2
    assert not native.int4_usable(x, scale_zero[:, :48], 64)  # a width of part of a block: torch's kernel


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_one_decode_row_takes_the_row_kernel_and_keeps_its_shape(mode):
    """A quantized linear's one-row product (decode's hot path, `native.one_row`) gives the row
    kernel's bits in x's leading shape; several rows and float32 take the other routes."""
    g = torch.Generator().manual_seed(3)
    spec = quant.QuantSpec(mode, 32)
    m = quant.QuantLinear(256, 128, spec, torch.bfloat16, "cpu")
    w = torch.randn(128, 256, generator=g)
    parts = quant.quantize_int8(w, torch.bfloat16) if mode == "int8" else quant.quantize_int4(w, 32, torch.bfloat16)
    for name, t in zip(m.names, parts):
        setattr(m, name, t)
    x = torch.randn(1, 1, 256, generator=g).bfloat16()
    block = quant._int4_block()
    if not native._ready():
        assert native.one_row(mode, x, *parts, 32, block) is None
        return
    rows = native.int8_rows(x.view(1, -1), *parts) if mode == "int8" else native.int4_rows(x.view(1, -1), *parts, 32)
    with torch.inference_mode():
        y = m(x)
    assert y.shape == (1, 1, 128) and torch.equal(y.view(1, -1), rows)
    assert native.one_row(mode, torch.randn(2, 256).bfloat16(), *parts, 32, block) is None
    assert native.one_row(mode, x.float(), *parts, 32, block) is None


def _check_avx2_kernels(g: torch.Generator) -> None:
    """The AVX2 build's int4 row kernel and its float32 tiles (int4 and int8) against the exact sums,
    in this process's int4 packing."""
    block = quant._int4_block()
    for N, K, group in [(64, 256, 32), (192, 1024, 128), (128, 512, 64), (64, 512, 256)]:
        packed, scale_zero = quant.quantize_int4(torch.randn(N, K, generator=g), group, torch.bfloat16)
        x = torch.randn(3, K, generator=g).bfloat16()
        exact = x.double() @ quant.dequantize_int4(packed, scale_zero, group, N, K, torch.float64).T
        assert native.int4_rows_usable(scale_zero, block) and not native.int4_usable(x, scale_zero, block)
        for rows in (1, 3):
            ours = native.int4_rows(x[:rows], packed, scale_zero, group, block)
            assert _rel(ours, exact[:rows]) <= 4e-3, (N, K, rows)
        with torch.inference_mode():
            y = quant._matmul("int4", group, x[:1, None], packed, scale_zero)  # decode's one row takes it
        assert torch.equal(y.view(1, -1), native.int4_rows(x[:1], packed, scale_zero, group, block))
    assert not native.int4_rows_usable(scale_zero[:, :block // 2], block)  # part of a block: torch's kernel
    # Many rows (prefill): dequantized tiles through the GEMM, in float32 on an AVX2 build.
    N, K, group = 1088, 256, 64  # a second, partial tile of 64 rows
    packed, scale_zero = quant.quantize_int4(torch.randn(N, K, generator=g), group, torch.bfloat16)
    q, scale = quant.quantize_int8(torch.randn(N, K, generator=g), torch.bfloat16)
    many = torch.randn(quant.TILED_FROM["int4"], K, generator=g).bfloat16()
    assert native.tiles_usable(many, scale_zero)
    exact = many.double() @ quant.dequantize_int4(packed, scale_zero, group, N, K, torch.float64).T
    assert _rel(quant.int4_linear(many, packed, scale_zero, group), exact) <= 4e-3
    exact = many.double() @ (q.double() * scale.double()[:, None]).T
    assert _rel(quant.int8_linear(many, q, scale), exact) <= 4e-3


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="the AVX2 build needs a CPU with AVX2")
def test_an_avx2_build_holds_the_row_kernels_alone(tmp_path, monkeypatch):
    """Built for a CPU with AVX2 but no AVX512-BF16 (most desktops: here by building for AVX2 and FMA
    instead of this machine's own CPU), native.c holds the int8 and int4 row kernels and float32 tiles
    (level 1). Their sums are the exact ones rounded to bf16, and decode's one row takes them;
    prefill's tiles are float32 there (no bf16 GEMMs); the blocked int8 kernel and the norm go to torch's."""
    monkeypatch.setenv("HERD_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", native.AVX2_FLAGS)
    native.library.cache_clear()
    native.level.cache_clear()
    try:
        if native.library() is None:
            pytest.skip("no C compiler")
        assert native.level() == 1 and not native._ready()
        g = torch.Generator().manual_seed(9)
        for N, K in [(96, 256), (40, 1000), (8, 5), (1100, 128)]:
            q, scale = quant.quantize_int8(torch.randn(N, K, generator=g), torch.bfloat16)
            x = torch.randn(quant.NATIVE_ROWS["int8"], K, generator=g).bfloat16()
            exact = x.double() @ (q.double() * scale.double()[:, None]).T
            assert native.int8_rows_usable(x, scale) and not native.usable(x, scale)
            for rows in (1, 3, 4, 7):
                assert _rel(native.int8_rows(x[:rows], q, scale), exact[:rows]) <= 4e-3, (N, K, rows)
            with torch.inference_mode():
                y = native.one_row("int8", x[:1], q, scale, 128, 0)
            assert torch.equal(y, native.int8_rows(x[:1], q, scale))
        _check_avx2_kernels(g)
        assert native.rms_norm(torch.randn(2, 64).bfloat16(), None, 1e-5) is None
    finally:
        native.library.cache_clear()
        native.level.cache_clear()


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="the AVX2 build needs a CPU with AVX2")
def test_the_avx2_int4_kernels_read_torchs_avx2_packing(tmp_path):
    """On an AVX2 CPU torch packs int4 in blocks of 32 rows, not 64: torch's AVX2 code path forced
    (ATEN_CPU_CAPABILITY, in a fresh process), the AVX2 build's row kernel and tiles read that packing."""
    import os
    import subprocess
    import sys

    script = ("import torch, tests.test_quant as t\nfrom herd.kernels import native, quant\n"
              "native.FLAGS = native.AVX2_FLAGS\nassert quant._int4_block() == 32 and native.level() == 1\n"
              "t._check_avx2_kernels(torch.Generator().manual_seed(5))\nprint('ok')")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "HERD_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "no C compiler" in out.stderr or "failed, so decode" in out.stderr:
        pytest.skip("no C compiler")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_native_kernel_falls_back_with_one_line_when_it_cannot_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HERD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.library.cache_clear()
    native.level.cache_clear()
    try:
        assert native.library() is None
        assert "no-such-cc failed, so decode uses torch's slower kernels" in capsys.readouterr().err
        q, scale = quant.quantize_int8(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), torch.bfloat16)
        x = torch.ones(1, 64).bfloat16()
        assert not native.usable(x, scale)
        assert torch.equal(quant.int8_linear(x, q, scale), torch.ops.aten._weight_int8pack_mm(x, q, scale))
        g = torch.Generator().manual_seed(56)
        q, scale = quant.quantize_int8(torch.randn(8, 56, generator=g), torch.bfloat16)  # torch's kernel sums wrong
        x = torch.randn(1, 56, generator=g).bfloat16()
        exact = x.double() @ (q.double() * scale.double()[:, None]).T
        assert _rel(quant.int8_linear(x, q, scale), exact) <= 1e-2  # the weights are rounded to bf16 there
        monkeypatch.setenv("HERD_NATIVE_KERNELS", "0")
        monkeypatch.delenv("CC")
        native.library.cache_clear()
        native.level.cache_clear()
        assert native.library() is None and capsys.readouterr().err == ""
    finally:
        native.library.cache_clear()
        native.level.cache_clear()


def _dequantized_twin(quantized: TextModel, plain: TextModel) -> TextModel:
    """``plain`` (the same architecture, unquantized) given the weights the quantized one stands for."""
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, quant.QuantLinear):
                plain.get_submodule(name).weight.copy_(m.dequantized())
            elif isinstance(m, quant.QuantExperts):
                target = plain.get_submodule(name)
                for proj in ("w1", "w3", "w2"):
                    getattr(target, proj).copy_(torch.stack([m.dequantized(proj, e) for e in range(m.num_experts)]))
    return plain


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-g{s.group}")
@pytest.mark.parametrize("name", ["tiny-interleaved"])  # MoE and dense layers, RoPE and NoPE
def test_quantized_model_equals_its_dequantized_twin(name, spec):
    """Logits over 5+ attention chunks (temperature tuning active) against the unquantized model given
    the dequantized weights: the routed experts' score still scales their input, as in the reference."""
    modules = quant.MODULES  # everything that can be quantized, the output head included
    llm = herd.load(name, quantize=spec.mode, quantize_group=spec.group, quantize_modules=modules, progress=False)
    twin = _dequantized_twin(llm.model, herd.load(name, progress=False, kernels=False).model)
    ids = torch.tensor([llm.tokenizer.encode(PROMPT, bos=True)])
    assert ids.shape[1] > 4 * llm.config.text.attention_chunk_size
    with torch.inference_mode():
        assert _rel(llm.model(ids), twin(ids)) <= 1e-2
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert {"QuantLinear"} <= kinds and ("QuantExperts" in kinds) == (name != "tiny-dense")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_greedy_generation_equals_full_forwards(mode):
    """The cached engine (one-row products: the weight-only kernels) against full forwards (many rows:
    dequantize, then GEMM) of the same quantized model, in float32."""
    llm = herd.load("tiny-moe", quantize=mode, quantize_group=32, progress=False)
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    new = llm.generate(ids, max_new_tokens=10).token_ids
    assert new == full_forward_tokens(llm.model, ids, 10, llm.tokenizer.stop_ids)


@pytest.mark.parametrize("mode, at_most", [("int8", 0.52), ("int4", 0.32)])  # + scales: 2 and 4 bytes per row or group
def test_every_expert_stack_shrinks(mode, at_most):
    """No 3-D expert stack is skipped: every layer's experts hold int8 or packed int4, none of the
    bf16 stacks is left, and their bytes fell to about 1/2 or 1/4 (scales included: width 64 here)."""
    plain = herd.load("tiny-moe", dtype="bfloat16", progress=False).model
    q = herd.load("tiny-moe", dtype="bfloat16", quantize=mode, quantize_group=32, progress=False).model
    for (name, before), after in zip(((n, m) for n, m in plain.named_modules() if isinstance(m, Experts)),
                                     (m for _, m in q.named_modules() if isinstance(m, quant.QuantExperts))):
        old = sum(t.numel() * t.element_size() for t in before.state_dict().values())
        new = sum(t.numel() * t.element_size() for t in after.state_dict().values())
        assert new <= at_most * old, (name, new, old)
    assert not [n for n, m in q.named_modules() if isinstance(m, Experts)]


def test_loading_a_checkpoint_quantizes_as_it_streams(tmp_path):
    """herd.load(folder, quantize=...) gives bit for bit the quantization of the model loaded whole."""
    herd.load("tiny-moe", dtype="bfloat16", progress=False).save_pretrained(tmp_path / "ckpt")
    streamed = herd.load(tmp_path / "ckpt", dtype="bfloat16", quantize="int4", quantize_group=32, progress=False)
    whole = herd.load(tmp_path / "ckpt", dtype="bfloat16", progress=False, kernels=False).model
    quant.quantize_model(whole, quant.QuantSpec("int4", 32))
    a, b = streamed.model.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(streamed.generate("Hello", max_new_tokens=3).token_ids) == 3


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """FP8 runs on CUDA only (herd.load refuses a CPU); torch's CPU _scaled_mm is a slow reference of
    the same product, so with the refusal lifted the tests run the very code a GPU runs."""
    monkeypatch.setattr(quant, "check_fp8_device", lambda device: None)


def test_fp8_linear_is_its_rows_quantized_times_its_dequantized_weight():
    """quantize='fp8': float8 e4m3 weights with a float32 scale per row, each activation row quantized
    on the fly (W8A8 dynamic): the product of both dequantized operands, rounded once to bf16; and
    within e4m3's rounding of the unquantized product."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g)
    m = quant.QuantLinear(256, 96, quant.QuantSpec("fp8"), torch.bfloat16, device="cpu")
    for key, value in quant._quantize_one("", quant.QuantSpec("fp8"), torch.bfloat16, w).items():
        setattr(m, key, value)
    assert m.weight_fp8.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
    assert _rel(m.dequantized(), w) <= 2 ** -4  # e4m3: 3 bits of significand
    for shape in [(1, 256), (3, 256), (2, 5, 256)]:
        x = torch.randn(*shape, generator=g).bfloat16()
        with torch.inference_mode():
            y = m(x)
        xq, sx = quant.fp8_rows(x.reshape(-1, 256))
        exact = (xq.double() * sx.double()) @ m.dequantized().double().T
        assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 96)
        assert _rel(y.reshape(-1, 96), exact) <= 2 ** -8  # bf16's rounding of float32 sums
        assert _rel(y.reshape(-1, 96), x.reshape(-1, 256).float() @ w.T) <= 6e-2


def test_fp8_experts_in_one_grouped_product_equal_each_experts_own(fp8_on_cpu, monkeypatch):
    """The sm90 path for FP8 experts (`grouped_fp8`: pairs sorted by expert, each projection one
    torch._scaled_grouped_mm) gives each (token, expert) pair what its expert computes alone. The
    grouped kernel is CUDA-only, so here it is stood in for by its definition, one _scaled_mm per
    expert's rows; its real run is benchmarks/gpu.py's."""
    from herd.kernels.moe import grouped_fp8
    from herd.model.moe import dispatch

    def scaled_grouped_mm(a, b, scale_a, scale_b, offs, out_dtype):
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            out.append(torch._scaled_mm(a[start:end], b[e], scale_a=scale_a[start:end, None].contiguous(),
                                        scale_b=scale_b[e][None].contiguous(), out_dtype=out_dtype))
            start = end
        return torch.cat(out)

    monkeypatch.setattr(torch, "_scaled_grouped_mm", scaled_grouped_mm, raising=False)
    llm = herd.load("tiny-moe", dtype="bfloat16", quantize="fp8", progress=False)
    moe = llm.model.layers[0].feed_forward
    assert isinstance(moe.experts, quant.QuantExperts) and moe.experts.mode == "fp8"
    x = torch.randn(11, llm.config.text.dim, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.inference_mode():
        ids, scores = moe.route(x)
        ours = grouped_fp8(moe, x, ids, scores)
        theirs = dispatch(moe.experts.one, x, ids, scores, moe.experts.num_experts)
    assert _rel(ours, theirs) <= 2 ** -7


def test_fp8_model_generates_as_its_full_forwards(fp8_on_cpu):
    """Every linear in fp8 (the head included): logits within e4m3's rounding of the unquantized
    model's, and the cached engine's greedy tokens are the full forwards' of the same model."""
    llm = herd.load("tiny-moe", dtype="bfloat16", quantize="fp8", quantize_modules=quant.MODULES, progress=False)
    plain = herd.load("tiny-moe", dtype="bfloat16", progress=False)
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    with torch.inference_mode():
        assert _rel(llm.model(torch.tensor([ids])), plain.model(torch.tensor([ids]))) <= 0.1
    ids = ids[:24]  # torch's CPU _scaled_mm is slow: a short prompt
    assert llm.generate(ids, max_new_tokens=4).token_ids == full_forward_tokens(llm.model, ids, 4,
                                                                                llm.tokenizer.stop_ids)


def test_scout_int4_fits_62_gib_by_the_meta_device():
    llm = herd.load("scout", device="meta", dtype="bfloat16", quantize="int4")
    assert sum(t.numel() * t.element_size() for t in llm.model.state_dict().values()) <= 62 * 2 ** 30


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int3"), "quantize must be one of int8, int4"),
    (dict(quantize="int4", quantize_group=100), "group must be one of 32, 64, 128, 256"),
    (dict(quantize="int8", quantize_modules=("router",)), "quantize_modules must name some of"),
    (dict(quantize="int4"), r"layers.0.feed_forward.experts.w1 \[64, 64\]: int4 needs the input width divisible "
                            r"by the group \(128\)"),
    (dict(quantize="int8", adapters="somewhere"), "adapters are merged into full-precision weights"),
    (dict(quantize="fp8", dtype="bfloat16"), "quantize='fp8' runs on CUDA GPUs of compute capability 8.9\\+"),
])
def test_bad_quantization_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        herd.load("tiny-moe", progress=False, **kwargs)


def test_info_plans_memory_with_quantization(capsys):
    from herd.cli import main
    assert main(["info", "scout", "--quantize", "int4", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "quantized in int4 (group 128)" in out and "experts 50.80 GiB" in out and "total 76.16 GiB" in out
    assert main(["info", "scout", "--context", "131072"]) == 0
    assert "experts 191.25 GiB" in capsys.readouterr().out


@pytest.mark.slow  # loads herd-tiny three times
def test_perplexity_compares_a_quantized_model_with_its_unquantized_self(tmp_path, capsys):
    from herd.cli import main
    from herd.evaluate import quality
    text = tmp_path / "story.txt"
    text.write_text("Mia went to the park with her red ball. She saw a big dog. " * 30)
    assert main(["perplexity", "--dtype", "bfloat16", "--quantize", "int8", "--compare", "--text", str(text),
                 "--window", "128"]) == 0
    out = capsys.readouterr().out
    assert "mean KL divergence" in out and "top-1 agreement" in out
    llm = herd.load("herd-tiny", progress=False)
    same = quality(llm, llm.tokenizer.encode(text.read_text(), bos=True), llm, window=128, progress=False)
    assert same.mean_kl == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(same.reference_perplexity)
    assert main(["perplexity", "--text", str(text), "--compare"]) == 2  # nothing quantized to compare


# ---- QLoRA: adapters on a quantized base -------------------------------------------------------

EVERY_TARGET = ["attention", "shared_expert", "experts", "dense_ffn", "output"]


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: f"{s.mode}-g{s.group}")
def test_qlora_starts_at_the_base_trains_through_it_and_merges(spec):
    """Adapters on every module kind of a model quantized everywhere (routed and shared experts, dense
    FFNs, attention, head): zero at init; the loss and every adapter's gradients equal those of the
    plain model holding the dequantized weights (gradients cross the quantized products of the later
    layers to reach layer 0); merging into the dequantized state gives the quantized model's logits."""
    from herd.model.lora import add_adapters, merge
    from herd.train.loss import summed_loss

    llm = herd.load("tiny-interleaved", quantize=spec.mode, quantize_group=spec.group, quantize_modules=quant.MODULES,
                    vision=False, progress=False)
    model = llm.model
    ids = torch.tensor([llm.tokenizer.encode(PROMPT, bos=True)])
    with torch.no_grad():
        base = model(ids)
        add_adapters(model, 4, 8.0, EVERY_TARGET)
        assert torch.equal(model(ids), base)  # B = 0: exactly the quantized base
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():  # B != 0, so A gets a gradient too
            if "_B" in name or name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    plain = herd.load("tiny-interleaved", vision=False, progress=False, kernels=False).model
    add_adapters(plain, 4, 8.0, EVERY_TARGET)
    plain.load_state_dict(quant.plain_state(model, dequantized=True))
    for m in (model, plain):
        summed_loss(m, ids[:, :-1], ids[:, 1:]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    twin = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads.keys() == twin.keys() and len(grads) == 2 * (4 * 4 + 3 * 2 + 3 * 2 + 3 * 2 + 1)
    for needs in ("layers.0.attention.wq", "layers.1.feed_forward.shared_expert.w1", "layers.1.feed_forward.experts",
                  "layers.0.feed_forward.w2", "output"):
        assert any(n.startswith(needs + ".adapter") and float(g.abs().max()) > 0 for n, g in grads.items()), needs
    for n, g in grads.items():
        assert _rel(g, twin[n]) <= 1e-4, n
    with torch.no_grad():
        trained = model(ids)
        merge(plain)
        assert _rel(plain(ids), trained) <= 1e-5
    with pytest.raises(ValueError, match="cannot take merged weights"):
        merge(model)


def test_qlora_steps_under_bfloat16_autocast():
    """train.dtype = bfloat16: the kernels take neither autocast nor mixed dtypes (a few rows reach an
    expert in bf16), so those products go through the dequantized weight, forward and backward."""
    from herd.model.lora import add_adapters
    from herd.train.loss import summed_loss

    llm = herd.load("tiny-moe", quantize="int4", quantize_group=32, vision=False, progress=False)
    add_adapters(llm.model, 4, 8.0, ["attention", "shared_expert", "experts"])
    ids = torch.tensor([llm.tokenizer.encode(PROMPT, bos=True)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = summed_loss(llm.model, ids[:, :-1], ids[:, 1:])
        with torch.no_grad():
            assert torch.isfinite(llm.model(ids[:, :5])).all()  # evaluation: few rows, no gradient
    loss.backward()
    grads = [p.grad for p in llm.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
