"""Loading by slices for tensor parallelism: each rank reads only its own part of every tensor of a
checkpoint (Hugging Face fused or expert-by-expert, Meta fused or unfused), and gets exactly the
weights `shard` keeps of the whole model. No process group is needed: rank r's load is one call."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import herd
from herd.checkpoint import hf
from herd.checkpoint.load import READ_BYTES, load_model, save_hf
from herd.checkpoint.meta import MetaShards, to_meta
from herd.config import ModelConfig, to_meta_params
from herd.distributed import pipeline
from herd.distributed.tensor import TensorParallel, parts, shard, shard_parts
from herd.kernels import quant
from herd.model.transformer import TextModel
from tests.conftest import randomize, tiny_text

# Interleaved MoE, 8 heads over 4 KV heads, 4 experts; a vocabulary no T divides (the head is padded).
CFG = tiny_text("tiny-interleaved", n_heads=8, n_kv_heads=4, vocab_size=1001)
SPLITS = [(2, False), (4, False), (2, True), (4, True)]  # (T, expert parallel)


@pytest.fixture(scope="module")
def model() -> TextModel:
    return randomize(TextModel(CFG), seed=1, std=0.2)


def _write_meta(folder, shards):
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(to_meta_params(ModelConfig(CFG))))
    for i, s in enumerate(shards):
        torch.save(s, folder / f"consolidated.{i:02d}.pth")
    return folder


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    sd = model.state_dict()
    out = {"hf-fused": save_hf(model, root / "hf-fused")}
    one_by_one = save_hf(model, root / "hf-experts")  # the same folder, its experts stored one by one
    save_file({k: v.contiguous() for k, v in hf.to_hf(sd, CFG, experts_one_by_one=True).items()},
              str(one_by_one / "model.safetensors"), metadata={"format": "pt"})
    out["hf-experts"] = one_by_one
    out["meta-fused"] = _write_meta(root / "meta-fused", to_meta(sd, CFG, fused=True))
    out["meta"] = _write_meta(root / "meta", to_meta(sd, CFG))
    out["meta-mp2"] = _write_meta(root / "meta-mp2", to_meta(sd, CFG, fused=True, mp=2))
    return out


def _load_rank(folder, tp: TensorParallel) -> tuple[TextModel, dict[str, int]]:
    READ_BYTES.clear()
    text, _ = load_model(folder, dtype=torch.float32, progress=False, vision=False, shard=lambda m: shard_parts(m, tp))
    return text, dict(READ_BYTES)


@pytest.mark.parametrize("size,ep", SPLITS)
@pytest.mark.parametrize("layout", ["hf-fused", "hf-experts", "meta-fused", "meta", "meta-mp2"])
def test_each_rank_reads_only_its_slices(model, folders, layout, size, ep):
    full = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}  # float32 on disk too
    read_by_ranks = 0
    for rank in range(size):
        tp = TensorParallel(rank, size, expert_parallel=ep)
        ours, read = _load_rank(folders[layout], tp)
        want = shard(copy.deepcopy(model), tp)
        assert type(ours) is type(want)  # a TPTextModel, its blocks TPBlocks
        theirs = want.state_dict()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs[key]), key
        # Bytes taken out of the files for each tensor: its part only; the replicated ones whole.
        table = parts(CFG, tp)
        expected = {k: n * table[k].length // model.get_parameter(k).shape[table[k].dim] if k in table else n
                    for k, n in full.items()}
        assert read == expected
        read_by_ranks += sum(read.values())
    replicated = sum(n for k, n in full.items() if k not in parts(CFG, TensorParallel(0, size)))
    # Together the ranks read the split tensors once and the replicated ones T times.
    assert read_by_ranks == sum(full.values()) + (size - 1) * replicated
    print(f"{layout} T={size}{' EP' if ep else ''}: rank 0 read {sum(read.values()) / 1e3:.0f} kB of "
          f"{sum(full.values()) / 1e3:.0f} kB ({replicated / 1e3:.0f} kB replicated)")


@pytest.mark.parametrize("size,stages", [(1, 2), (2, 2)])
def test_a_pipeline_stage_reads_only_its_own_layers(model, folders, size, stages):
    """With P stages, a rank reads its tensor-parallel part of its stage's layers and nothing of the
    others': loading needs memory for 1/(T·P) of the layers. The embedding is read by stage 0 only,
    the output head by the last stage only."""
    full = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    read_by_ranks = 0
    for stage in range(stages):
        for rank in range(size):
            tp = TensorParallel(rank, size, stage=stage, stages=stages)
            READ_BYTES.clear()
            ours, _ = load_model(folders["hf-fused"], dtype=torch.float32, progress=False, vision=False,
                                 shard=lambda m: pipeline.stage_parts(m, tp))
            want = copy.deepcopy(model)
            want = pipeline.split(shard(want, tp) if size > 1 else want, tp).state_dict()
            assert ours.state_dict().keys() == want.keys()
            assert all(torch.equal(v, want[k]) for k, v in ours.state_dict().items())
            table = parts(CFG, tp) if size > 1 else {}
            layers = [f"layers.{i}." for i in tp.layers(CFG.n_layers)]
            expected = {k: n * table[k].length // model.get_parameter(k).shape[table[k].dim] if k in table else n
                        for k, n in full.items() if not k.startswith("layers.") or k.startswith(tuple(layers))}
            expected["tok_embeddings.weight"] *= stage == 0
            expected["output.weight"] *= stage == stages - 1
            assert dict(READ_BYTES) == {k: n for k, n in expected.items()}
            read_by_ranks += sum(READ_BYTES.values())
    layer_bytes = sum(n for k, n in full.items() if k.startswith("layers."))
    print(f"T={size} P={stages}: the ranks read {read_by_ranks / 1e3:.0f} kB of {sum(full.values()) / 1e3:.0f} kB "
          f"({layer_bytes / 1e3:.0f} kB of layers, read once over all ranks)")


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_slices_are_cut_to_a_view_before_they_are_joined(model, mp):
    """MetaShards.read_view equals the view of the joined tensor. It reads the view's bytes when the view
    is a box of the joined tensor (any view of a single file), else the whole tensor (a copy)."""
    shards = MetaShards(to_meta(model.state_dict(), CFG, fused=True, mp=mp))
    key = "layers.1.feed_forward.experts.moe_w_in_eD_F"  # [E*D, F] joined from [E*D, F/mp] slices
    E, D, F = 4, CFG.dim, CFG.moe.expert_dim
    whole = E * D * F * 4
    experts = lambda t: t.reshape(E, D, F)  # noqa: E731  (one file: [E*D, F]; joined: [E, D, F])
    for view, nbytes in [
        (lambda t: experts(t).transpose(1, 2)[1:3], whole // 2),  # two whole experts
        (lambda t: experts(t).transpose(1, 2).narrow(1, F // 4, F // 2), whole // 2),  # F/2 of each
        (lambda t: experts(t)[..., :F // 4], whole // 4),
        (lambda t: t.reshape(E * D, F).t().contiguous()[:8], whole),  # a copy
        (lambda t: t.reshape(-1)[5:9], 16),
        (lambda t: t.reshape(-1)[F - 2:F + 2], 16 if mp == 1 else whole),  # across two rows: not a box
    ]:
        value, read = shards.read_view(key, view)
        assert torch.equal(value, view(shards[key])) and read == nbytes


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_preset_is_made_whole_then_split(quantize):
    """A preset's random weights (quantized whole, if asked) are split by `shard` after they are made."""
    tp = TensorParallel(1, 2, expert_parallel=quantize != "int8")
    opts = dict(vision=False, kernels=False, quantize=quantize, quantize_group=32)
    llm = herd.load("tiny-interleaved", shard=lambda m: shard_parts(m, tp), **opts)
    whole = herd.load("tiny-interleaved", **opts)
    theirs = shard(whole.model, tp).state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in llm.model.state_dict().items())


QUANTIZED = [quant.QuantSpec("int8", modules=quant.MODULES),
             quant.QuantSpec("int4", 32, ("experts", "shared_expert", "attention"))]


def _int8_rows_read_whole(key: str, spec: quant.QuantSpec, table) -> bool:
    """int8 weights split along their input are read whole: each row's scale is its whole row's."""
    part = table.get(key)
    return spec.mode == "int8" and part is not None and part.dim == (2 if ".experts." in key else 1)


@pytest.mark.parametrize("spec,size,ep", [(QUANTIZED[0], 2, False), (QUANTIZED[0], 4, False), (QUANTIZED[0], 2, True),
                                           (QUANTIZED[1], 2, False), (QUANTIZED[1], 2, True)],
                         ids=["int8-2", "int8-4", "int8-2-EP", "int4-2", "int4-2-EP"])
def test_quantized_while_loading_each_rank_holds_its_part_of_the_whole_quantization(model, folders, spec, size, ep):
    """Each rank's integers and scales are exactly its part of the model quantized whole in one process,
    and it reads only its parts, except int8 weights split along their input (read whole, cut once
    quantized). int4 groups never straddle two ranks' parts."""
    whole = quant.quantize_model(copy.deepcopy(model), spec)
    full = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    for rank in range(size):
        tp = TensorParallel(rank, size, expert_parallel=ep)
        READ_BYTES.clear()
        ours, _ = load_model(folders["hf-fused"], dtype=torch.float32, progress=False, vision=False,
                             shard=lambda m: shard_parts(m, tp),
                             quantize=lambda m, stored, keep: quant.install(m, spec, torch.float32, None, keep))
        theirs = shard(copy.deepcopy(whole), tp).state_dict()
        assert ours.state_dict().keys() == theirs.keys()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs[key]), key
        table = parts(CFG, tp)
        expected = {k: n if k not in table or _int8_rows_read_whole(k, spec, table)
                    else n * table[k].length // model.get_parameter(k).shape[table[k].dim] for k, n in full.items()}
        assert dict(READ_BYTES) == expected


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_checkpoint_is_read_by_parts_as_stored(model, tmp_path, mode):
    """A compressed-tensors checkpoint (herd's int8 channels or int4 groups): each rank reads its part
    of the stored integers and scales and holds exactly that part of the whole loaded model."""
    spec = quant.QuantSpec(mode, 32, quant.DEFAULT_MODULES)
    saved = save_hf(quant.quantize_model(copy.deepcopy(model), spec), tmp_path / mode)
    whole = load_model(saved, dtype=torch.float32, progress=False, vision=False,
                       quantize=lambda m, stored, keep: quant.install(m, spec, torch.float32, stored, keep))[0]
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        READ_BYTES.clear()
        ours, _ = load_model(saved, dtype=torch.float32, progress=False, vision=False, shard=lambda m: shard_parts(m, tp),
                             quantize=lambda m, stored, keep: quant.install(m, spec, torch.float32, stored, keep))
        theirs = shard(copy.deepcopy(whole), tp).state_dict()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs[key]), key
        w2 = "layers.1.feed_forward.experts.w2"  # [E, D, F]: split along its input F, stored per channel or group
        E, D, F = 4, CFG.dim, CFG.moe.expert_dim
        if mode == "int8":  # half the int8 values, every row's float32 scale
            assert READ_BYTES[w2] == E * D * F // 2 + E * D * 4
        else:  # half the packed values, float32 scales and (unpacked) int8 zero points of half the groups
            assert READ_BYTES[w2] == (E * D * F // 2 + E * D * (F // 32) * (4 + 1)) // 2


def test_int4_parts_must_be_whole_groups(folders):
    """A split that would cut an int4 group is refused before a weight is read, naming the tensor."""
    spec = quant.QuantSpec("int4", 32)
    tp = TensorParallel(0, 4)  # expert width 64 / 4 = 16 inputs per rank: half a group
    with pytest.raises(ValueError, match=r"experts.w2 \[64, 16\] \(a tensor-parallel rank's part of 4\): int4 needs"):
        load_model(folders["hf-fused"], dtype=torch.float32, progress=False, vision=False,
                   shard=lambda m: shard_parts(m, tp),
                   quantize=lambda m, stored, keep: quant.install(m, spec, torch.float32, None, keep))
