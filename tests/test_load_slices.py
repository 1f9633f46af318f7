"""Loading by slices for tensor parallelism: each rank reads only its own part of every tensor of a
checkpoint (Hugging Face fused or expert-by-expert, Meta fused or unfused), and gets exactly the
weights `shard` keeps of the whole model. No process group is needed: rank r's load is one call."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import herd
from herd.checkpoint import hf
from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.load import READ_BYTES, load_model, save_hf
from herd.checkpoint.meta import MetaShards, to_meta
from herd.config import ModelConfig, to_meta_params
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


def test_a_preset_is_made_whole_then_split():
    tp = TensorParallel(1, 2, expert_parallel=True)
    llm = herd.load("tiny-interleaved", vision=False, kernels=False, shard=lambda m: shard_parts(m, tp))
    whole = herd.load("tiny-interleaved", vision=False, kernels=False)
    theirs = shard(whole.model, tp).state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in llm.model.state_dict().items())


def test_quantized_checkpoints_are_refused(tmp_path):
    """int8/int4 checkpoints (compressed-tensors) load as they were quantized, and shard() has no split
    of quantized experts yet: refused before a weight is read."""
    cfg = tiny_text("tiny-interleaved", n_heads=8, n_kv_heads=4, vocab_size=3072)  # herd-tiny's tokenizer
    model = quant.quantize_model(randomize(TextModel(cfg), seed=1), quant.QuantSpec("int8"))
    tokenizer = Path(herd.__file__).parent / "bundled" / "herd-tiny" / "tokenizer.json"
    folder = save_hf(model, tmp_path / "int8", extra_files={"tokenizer.json": tokenizer})
    with pytest.raises(CheckpointError, match="quantized weights cannot be split over tensor-parallel ranks"):
        herd.load(folder, vision=False, shard=lambda m: shard_parts(m, TensorParallel(0, 2)))
