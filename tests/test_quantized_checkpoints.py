"""Quantized checkpoints in the compressed-tensors layout (herd.checkpoint.compressed): files written
by the compressed-tensors package itself (FP8 as Meta's Maverick FP8 release, W4A16 as RedHat's,
W8A16) load in herd against the weights that package dequantizes; herd's own quantized saves reload
bit for bit and decompress, in that package, to the weights herd computes with."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd.checkpoint.errors import CheckpointError
from herd.kernels import quant

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402

MODEL = "tiny-interleaved"  # MoE and dense layers, RoPE and NoPE, a vision encoder
PROMPT = "The quick brown fox jumps over the lazy dog, then sleeps in the warm afternoon sun. " * 2
TEXT = "language_model.model."


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _logits(llm, ids=None) -> torch.Tensor:
    ids = torch.tensor([llm.tokenizer.encode(PROMPT, bos=True)]) if ids is None else ids
    with torch.inference_mode():
        return llm.model(ids)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("plain") / "model"
    herd.load(MODEL, progress=False).save_pretrained(folder)
    return str(folder)


SCHEMES = {  # name: (weights, input activations, format, modules left alone)
    "fp8-channel": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                    {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
                    "float-quantized", r"re:.*(self_attn|router|lm_head).*"),
    "fp8-block": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "block_structure": [16, 32]},
                  None, "float-quantized", r"re:.*(router|lm_head).*"),
    "w4a16-sym": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}, None,
                  "pack-quantized", r"re:.*(self_attn|router|lm_head).*"),
    "w4a16-asym": ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}, None,
                   "pack-quantized", r"re:.*(router|lm_head).*"),
    "w8a16": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, None, "pack-quantized",
              r"re:.*(router|lm_head).*"),
}


def _qparams(w: torch.Tensor, weights: dict) -> dict:
    """Scale (and zero point) of a min-max observer, in the shapes compressed-tensors stores."""
    N, K = w.shape
    if weights["strategy"] == "block":
        bn, bk = weights["block_structure"]
        view = w.reshape(N // bn, bn, K // bk, bk).abs().amax(dim=(1, 3))
        return {"weight_scale": (view / 448).to(torch.bfloat16)}
    g = weights.get("group_size") or K
    wg = w.reshape(N, K // g, g)
    if weights["type"] == "float":
        return {"weight_scale": (wg.abs().amax(-1) / 448).to(torch.bfloat16)}
    levels = 2 ** weights["num_bits"] - 1
    if weights["symmetric"]:
        return {"weight_scale": (wg.abs().amax(-1) * 2 / levels).clamp(min=1e-8).to(torch.bfloat16)}
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.bfloat16)
    zero = (torch.round(-lo / scale.float()) - 2 ** (weights["num_bits"] - 1)).to(torch.int8)
    return {"weight_scale": scale, "weight_zero_point": zero}


def _quantized_folder(plain: str, out, scheme_name: str) -> dict[str, torch.Tensor]:
    """``plain`` rewritten as llm-compressor writes a quantized Llama 4: experts one by one, every
    targeted Linear compressed by the compressed-tensors package. Returns, per quantized module,
    the weight that package dequantizes."""
    weights, inputs, fmt, ignore = SCHEMES[scheme_name]
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    compressor = FloatQuantizationCompressor if fmt == "float-quantized" else PackedQuantizationCompressor
    shutil.copytree(plain, out)
    sd = load_file(f"{out}/model.safetensors")
    linears = {}
    for key in list(sd):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t = sd.pop(key)  # [E, in, out]
            prefix = key.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if key.endswith("gate_up_proj"):
                    half = t.shape[-1] // 2
                    linears[f"{prefix}.{e}.gate_proj"] = t[e, :, :half].t().contiguous()
                    linears[f"{prefix}.{e}.up_proj"] = t[e, :, half:].t().contiguous()
                else:
                    linears[f"{prefix}.{e}.down_proj"] = t[e].t().contiguous()
        elif key.endswith(".weight") and key.startswith(TEXT) and sd[key].dim() == 2 and "embed_tokens" not in key:
            linears[key[:-7]] = sd.pop(key)
    import re
    pattern = re.compile(ignore[3:])
    dequantized = {}
    for module, w in linears.items():
        if pattern.match(module):
            sd[f"{module}.weight"] = w
            continue
        state = compressor.compress({"weight": w.float()} | _qparams(w.float(), weights), scheme)
        sd |= {f"{module}.{k}": v for k, v in state.items()}
        exact = {k: v.float() if k == "weight_scale" else v for k, v in state.items()}  # its float32 product
        dequantized[module] = compressor.decompress(exact, scheme)["weight"]
    save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "format": fmt}
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt,
                                     "quantization_status": "compressed", "config_groups": {"group_0": group},
                                     "ignore": [ignore, "re:vision_model.*", "re:multi_modal_projector.*"]}
    (out / "config.json").write_text(json.dumps(config))
    return dequantized


def _twin(plain: str, dequantized: dict[str, torch.Tensor]):
    """The unquantized model given the weights compressed-tensors dequantizes."""
    llm = herd.load(plain, progress=False, kernels=False)
    experts = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    attention = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
    with torch.no_grad():
        for module, w in dequantized.items():
            parts = module[len(TEXT):].split(".")
            if "experts" in parts:  # layers.i.feed_forward.experts.e.gate_proj
                getattr(llm.model.get_submodule(".".join(parts[:4])), experts[parts[5]])[int(parts[4])].copy_(w)
            else:
                parts[-1] = attention.get(parts[-1]) or experts[parts[-1]]
                parts = ["attention" if p == "self_attn" else p for p in parts]
                llm.model.get_submodule(".".join(parts)).weight.copy_(w)
    return llm


QUICK = ("w4a16-sym",)  # the rest run in CI's full suite (slow)


@pytest.mark.parametrize("scheme", [s if s in QUICK else pytest.param(s, marks=pytest.mark.slow) for s in SCHEMES])
def test_compressed_tensors_checkpoints_load_as_that_package_dequantizes_them(scheme, plain_folder, tmp_path):
    """Integer schemes stay quantized (herd's kernels take the file's values as they are), FP8 runs
    dequantized to the load dtype; either way the logits are those of the dequantized weights."""
    dequantized = _quantized_folder(plain_folder, tmp_path / "q", scheme)
    llm = herd.load(tmp_path / "q", progress=False)
    reference = _twin(plain_folder, dequantized)
    assert _rel(_logits(llm), _logits(reference)) <= 1e-2
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert ("QuantExperts" in kinds) == scheme.startswith("w")
    if scheme == "w4a16-sym":  # attention was left alone by the file, and stays so
        assert type(llm.model.layers[0].attention.wq).__name__ != "QuantLinear"
        assert type(llm.model.layers[1].feed_forward.shared_expert.w1).__name__ == "QuantLinear"


@pytest.mark.slow
def test_fp8_loads_as_int8_when_asked(plain_folder, tmp_path):
    dequantized = _quantized_folder(plain_folder, tmp_path / "q", "fp8-channel")
    llm = herd.load(tmp_path / "q", progress=False, quantize="int8", quantize_modules=("experts", "shared_expert",
                                                                                        "dense_ffn"))
    assert isinstance(llm.model.layers[0].feed_forward.w1, quant.QuantLinear)
    assert _rel(_logits(llm), _logits(_twin(plain_folder, dequantized))) <= 2e-2


@pytest.mark.parametrize("mode, group", [("int4", 32), pytest.param("int4", 64, marks=pytest.mark.slow),
                                         pytest.param("int8", 128, marks=pytest.mark.slow)])
def test_quantized_save_reloads_bit_for_bit(mode, group, tmp_path):
    """`LLM.save_pretrained` of a quantized model writes compressed-tensors pack-quantized; herd
    reloads the very same quantized state (no second rounding), and the compressed-tensors package
    decompresses every module to the weight herd computes with."""
    llm = herd.load(MODEL, quantize=mode, quantize_group=group, quantize_modules=quant.MODULES, progress=False)
    llm.save_pretrained(tmp_path / "q")
    back = herd.load(tmp_path / "q", progress=False)
    a, b = llm.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(llm), _logits(back))

    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    group_cfg = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group_cfg["targets"], weights=group_cfg["weights"])
    sd = load_file(tmp_path / "q" / "model.safetensors")
    modules = sorted({k[:-len(".weight_packed")] for k in sd if k.endswith(".weight_packed")})
    assert len(modules) == 2 * 3 * 4 + 2 * 3 + 2 * 3 + 4 * 4 + 1  # experts, shared, dense, attention, head
    for module in modules[::5]:
        local = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == module}
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        ours = _dequantized(back.model, module)
        assert _rel(theirs, ours) <= 1e-6, module


def test_fp8_checkpoint_keeps_its_values_and_saves_as_it_loaded(plain_folder, tmp_path, monkeypatch):
    """quantize='fp8' (a GPU's FP8 tensor cores; herd refuses it on a CPU, lifted here to run the same
    code through torch's CPU _scaled_mm): an FP8 file's experts hold its float8 values and scales as
    they are (no second rounding), the logits are those of its dequantized weights within the
    activations' e4m3 rounding, and a save writes float-quantized tensors that herd reloads bit for
    bit and the compressed-tensors package decompresses to the weights herd computes with."""
    monkeypatch.setattr(quant, "check_fp8_device", lambda device: None)
    dequantized = _quantized_folder(plain_folder, tmp_path / "q", "fp8-channel")
    llm = herd.load(tmp_path / "q", dtype="bfloat16", progress=False, quantize="fp8")
    experts = llm.model.layers[1].feed_forward.experts
    assert isinstance(experts, quant.QuantExperts) and experts.mode == "fp8"
    sd = load_file(tmp_path / "q" / "model.safetensors")
    module = f"{TEXT}layers.1.feed_forward.experts.1.up_proj"
    assert torch.equal(experts.w3_weight_fp8[1].view(torch.uint8), sd[f"{module}.weight"].view(torch.uint8))
    assert torch.equal(experts.w3_weight_scale[1], sd[f"{module}.weight_scale"].float().view(-1))
    assert _rel(_logits(llm), _logits(_twin(plain_folder, dequantized))) <= 5e-2

    llm.save_pretrained(tmp_path / "again")
    back = herd.load(tmp_path / "again", dtype="bfloat16", progress=False, quantize="fp8")
    a, b = llm.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].element_size() == 1 else a[k],
                                                    b[k].view(torch.uint8) if b[k].element_size() == 1 else b[k])
                                        for k in a)
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    group_cfg = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group_cfg["targets"], weights=group_cfg["weights"],
                                input_activations=group_cfg["input_activations"])
    saved = load_file(tmp_path / "again" / "model.safetensors")
    for module in (f"{TEXT}layers.1.feed_forward.experts.1.up_proj", f"{TEXT}layers.1.feed_forward.shared_expert.down_proj"):
        local = {k.rsplit(".", 1)[1]: v for k, v in saved.items() if k.rsplit(".", 1)[0] == module}
        assert local["weight"].dtype == torch.float8_e4m3fn
        theirs = FloatQuantizationCompressor.decompress(local, scheme)["weight"]
        assert _rel(theirs, _dequantized(back.model, module)) <= 1e-6, module


def _dequantized(model, hf_module: str) -> torch.Tensor:
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv",
             "o_proj": "wo"}
    if hf_module == "language_model.lm_head":
        return model.output.dequantized()
    parts = hf_module[len(TEXT):].split(".")
    if "experts" in parts and parts[4].isdigit():
        return model.get_submodule(".".join(parts[:4])).dequantized(names[parts[5]], int(parts[4]))
    parts = ["attention" if p == "self_attn" else names.get(p, p) for p in parts]
    return model.get_submodule(".".join(parts)).dequantized()


@pytest.mark.slow  # a CLI round trip: load, quantize, save, load twice
def test_convert_writes_a_quantized_checkpoint(plain_folder, tmp_path, capsys):
    from herd.cli import main

    assert main(["convert", plain_folder, str(tmp_path / "q"), "--quantize", "int4", "--quantize-group", "32"]) == 0
    llm = herd.load(tmp_path / "q", dtype="bfloat16", progress=False)  # convert writes bfloat16 by default
    assert isinstance(llm.model.layers[1].feed_forward.experts, quant.QuantExperts)
    again = herd.load(plain_folder, dtype="bfloat16", quantize="int4", quantize_group=32, progress=False)
    assert torch.equal(_logits(llm), _logits(again))
    text = tmp_path / "text.txt"
    text.write_text(PROMPT * 4)
    capsys.readouterr()
    assert main(["perplexity", "--model", str(tmp_path / "q"), "--reference", plain_folder, "--text", str(text),
                 "--window", "64"]) == 0
    out = capsys.readouterr().out
    assert f"reference ({plain_folder}) perplexity" in out and "mean KL divergence" in out


def _edit(folder, tensors=None, config=None):
    if tensors is not None:
        sd = load_file(f"{folder}/model.safetensors")
        tensors(sd)
        save_file(sd, f"{folder}/model.safetensors", metadata={"format": "pt"})
    if config is not None:
        raw = json.loads((folder / "config.json").read_text())
        config(raw["quantization_config"])
        (folder / "config.json").write_text(json.dumps(raw))


SHARED = TEXT + "layers.1.feed_forward.shared_expert.gate_proj"


@pytest.mark.parametrize("tensors, config, message", [
    (lambda sd: sd.pop(f"{SHARED}.weight_scale"), None, f"missing tensor '{SHARED}.weight_scale'"),
    (lambda sd: sd.__setitem__(f"{SHARED}.weight_scale", torch.ones(64, 3)), None,
     f"'{SHARED}.weight_scale' has shape (64, 3)"),
    (lambda sd: sd.__setitem__(f"{SHARED}.weight_packed", torch.zeros(64, 4, dtype=torch.int32)), None,
     f"'{SHARED}.weight_packed' (64, 4) does not hold 4-bit values of shape [64, 64]"),
    (None, lambda qc: qc.__setitem__("quant_method", "gptq"), "quantization_config.quant_method 'gptq'"),
    (None, lambda qc: qc["config_groups"]["group_0"].__setitem__("format", "nvfp4-pack-quantized"),
     "config_groups.group_0.format 'nvfp4-pack-quantized' is not supported"),
    (None, lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__("num_bits", 2),
     "int 2-bit weights are not supported"),
    (None, lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__("actorder", "group"),
     "actorder 'group'"),
])
def test_bad_quantized_checkpoints_are_named_before_any_weight_is_read(tensors, config, message, plain_folder,
                                                                       tmp_path):
    _quantized_folder(plain_folder, tmp_path / "q", "w4a16-sym")
    _edit(tmp_path / "q", tensors, config)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        herd.load(tmp_path / "q", progress=False)


# ---- Meta's FP8 release -----------------------------------------------------------------------


def _meta_fp8(llm, mp: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Meta-format shards of ``llm`` with the routed experts quantized as Meta's quantize script does
    (float8, a scale per expert and output feature of each rank's own slice); also the shards with
    those weights dequantized (the reference) and the scales files."""
    from herd.checkpoint.meta import to_meta

    shards = to_meta(llm.model.state_dict(), llm.config.text, fused=True, mp=mp)
    plain, scales = [dict(s) for s in shards], [{} for _ in shards]
    E = llm.config.text.moe.num_experts
    for shard, ref, sc in zip(shards, plain, scales):
        for key in [k for k in shard if k.rpartition(".")[2] in ("moe_w_in_eD_F", "moe_w_swiglu_eD_F",
                                                                   "moe_w_out_eF_D")]:
            w = shard[key].view(E, -1, shard[key].shape[-1])  # [E, in, out]
            scale = w.abs().amax(dim=1) / 448  # [E, out], float32 as fbgemm's row-wise scales
            q = (w / scale[:, None, :]).to(torch.float8_e4m3fn)
            shard[key] = q.view(shard[key].shape)
            ref[key] = (q.float() * scale[:, None, :]).view(shard[key].shape)
            sc[key.rpartition(".")[0] + "." + {"moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3",
                                                "moe_w_out_eF_D": "w2"}[key.rpartition(".")[2]]] = scale
    return shards, plain, scales


@pytest.mark.parametrize("mp", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_meta_fp8_release_loads_dequantized(mp, tmp_path):
    """consolidated.NN.pth with float8 experts beside fp8_scales_N.pt: the same logits as the
    dequantized weights in an ordinary Meta checkpoint (each rank's slice scaled before the join);
    held in int8 when asked."""
    from tests.test_meta_format import write_meta

    llm = herd.load(MODEL, progress=False, vision=False)
    shards, plain, scales = _meta_fp8(llm, mp)
    cfg = llm.config.text
    write_meta(tmp_path / "fp8", cfg, shards)
    for i, sc in enumerate(scales):
        torch.save(sc, tmp_path / "fp8" / f"fp8_scales_{i}.pt")
    write_meta(tmp_path / "ref", cfg, plain)
    ours, reference = herd.load(tmp_path / "fp8", progress=False), herd.load(tmp_path / "ref", progress=False)
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=1e-6, atol=1e-6)
    as_int8 = herd.load(tmp_path / "fp8", progress=False, quantize="int8")
    assert isinstance(as_int8.model.layers[1].feed_forward.experts, quant.QuantExperts)
    assert _rel(_logits(as_int8), _logits(reference)) <= 2e-2

    (tmp_path / "fp8" / "fp8_scales_0.pt").unlink()
    torch.save({k: v for k, v in list(scales[0].items())[1:]}, tmp_path / "fp8" / "fp8_scales_0.pt")
    with pytest.raises(CheckpointError, match=r"fp8_scales_0.pt: missing scale 'layers.1.feed_forward.experts.w1'"):
        herd.load(tmp_path / "fp8", progress=False)


def test_info_plans_a_quantized_folder_as_stored(tmp_path, capsys):
    """`herd info` on a quantized folder counts the modules the file quantized, from its headers."""
    from herd.cli import main

    herd.load(MODEL, quantize="int4", quantize_group=32, quantize_modules=("experts",),
              progress=False).save_pretrained(tmp_path / "q")
    loaded = herd.load(tmp_path / "q", progress=False).memory(context=64)
    assert herd.load(tmp_path / "q", device="meta", progress=False).memory(context=64) == loaded
    assert main(["info", str(tmp_path / "q"), "--context", "64", "--dtype", "float32"]) == 0
    assert "quantized in int4 (group 32)" in capsys.readouterr().out
