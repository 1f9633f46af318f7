"""Meta's checkpoint format against Meta's own reference model (llama_models.llama4.model.Transformer).

Meta's Transformer runs here on CPU in float32: fairscale's model-parallel layers on a one-process
gloo group, and the reference's KV-cache `.cuda()` calls turned into no-ops while it is built.
Every checkpoint is written in the real format (params.json + consolidated.NN.pth via torch.save).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import herd
from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.meta import MetaShards, to_meta
from herd.config import ModelConfig, to_meta_params
from tests.conftest import assert_logits_close, randomize, tiny_text

T = 40  # five attention chunks of 8; temperature tuning is active from position 4 (floor_scale 4)
IDS = torch.randint(0, 202_048, (2, T), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as mp

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not mp.model_parallel_is_initialized():
        mp.initialize_model_parallel(1)
    yield


def meta_reference(cfg, seed: int):
    """Meta's Transformer with random float32 weights, built on CPU."""
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.model import Transformer

    args = ModelArgs(**to_meta_params(ModelConfig(cfg)), max_seq_len=64, max_batch_size=2)
    real_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference allocates its KV cache with .cuda()
    try:
        torch.manual_seed(seed)
        model = Transformer(args)
    finally:
        torch.Tensor.cuda = real_cuda
    return randomize(model.float(), seed, std=0.2)


def meta_logits(model, ids: torch.Tensor) -> torch.Tensor:
    from llama_models.llama4.datatypes import TransformerInput

    return model(TransformerInput(tokens=ids, tokens_position=0)).logits


def write_meta(folder: Path, cfg, shards: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(to_meta_params(ModelConfig(cfg))))
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


CASES = {
    "moe-top1": tiny_text("tiny-moe"),
    "interleaved-top2": tiny_text("tiny-interleaved"),
    "dense": tiny_text("tiny-dense"),
}


@pytest.mark.parametrize("name", CASES)
def test_meta_checkpoint_matches_meta_reference(name, model_parallel, tmp_path):
    """Meta's own state dict (its module names), loaded by herd: same logits as Meta's forward."""
    cfg = CASES[name]
    ref = meta_reference(cfg, seed=5)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    folder = write_meta(tmp_path / "meta", cfg, [sd])
    llm = herd.load(folder, progress=False)
    # params.json carries no context length (Meta passes max_seq_len at run time); all else matches.
    assert dataclasses.replace(llm.config.text, max_seq_len=cfg.max_seq_len) == cfg
    assert_logits_close(llm.logits(IDS), meta_logits(ref, IDS))


@pytest.mark.parametrize("name", ["moe-top1", "interleaved-top2"])
def test_fused_release_names_load_into_meta_reference_and_herd_alike(name, model_parallel, tmp_path):
    """herd's fused writer produces what Meta's load hooks accept; herd reads it back to the same logits."""
    cfg = CASES[name]
    ref = meta_reference(cfg, seed=6)
    ours = herd.load(write_meta(tmp_path / "unfused", cfg, [ref.state_dict()]), progress=False)
    (fused,) = to_meta(ours.model.state_dict(), cfg, fused=True)
    assert any(k.endswith("attention.wqkv.weight") for k in fused)
    assert any(k.endswith("experts.moe_w_in_eD_F") for k in fused)
    assert any(k.endswith("feed_forward.w_in_shared_FD.weight") for k in fused)
    if not all(cfg.is_moe):
        assert any(k.endswith("feed_forward.mlp.fc1_weight") for k in fused)
    # Keys real checkpoints carry that nothing reads: herd must skip them as Meta's loader does.
    extras = {"rope.freqs": torch.zeros(8), "layers.0.attention.wqkv._extra_state": torch.zeros(1)}
    if cfg.is_moe[0]:
        extras["layers.0.feed_forward.global_gate_stats_3E"] = torch.zeros(3, cfg.moe.num_experts)
    folder = write_meta(tmp_path / "fused", cfg, [{**fused, **extras}])

    fresh = meta_reference(cfg, seed=99)  # different weights, replaced by the fused checkpoint
    result = fresh.load_state_dict(torch.load(folder / "consolidated.00.pth"), strict=False)
    assert not result.missing_keys, result.missing_keys
    expected = meta_logits(fresh, IDS)
    assert_logits_close(meta_logits(ref, IDS), expected, rel=1e-6)  # the writer changed nothing
    assert_logits_close(herd.load(folder, progress=False).logits(IDS), expected)


@pytest.mark.parametrize("fused", [False, True])
def test_model_parallel_shards_are_joined(fused, model_parallel, tmp_path):
    """Two MP shards (Meta's split axes) load to exactly the single-shard weights; with fused names,
    the join agrees with Meta's own resharding (llama_models.checkpoint.reshard_mp)."""
    from llama_models.checkpoint import convert_moe_weights, reshard_mp

    cfg = CASES["interleaved-top2"]
    ref = meta_reference(cfg, seed=7)
    one = herd.load(write_meta(tmp_path / "one", cfg, [ref.state_dict()]), progress=False)
    shards = to_meta(one.model.state_dict(), cfg, fused=fused, mp=2)
    assert shards[0]["layers.0.attention.wo.weight"].shape[1] == cfg.n_heads * cfg.head_dim // 2
    two = herd.load(write_meta(tmp_path / "two", cfg, shards), progress=False)
    for (k, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        assert torch.equal(a, b), k
    if fused:
        theirs = reshard_mp([convert_moe_weights(dict(s), cfg.moe.num_experts) for s in shards], size=1, rank=0)
        ours = MetaShards(shards)
        for key in theirs:
            assert torch.equal(ours[key].reshape(theirs[key].shape), theirs[key]), key


def test_shards_with_different_names_are_refused(tmp_path):
    cfg = CASES["moe-top1"]
    llm = herd.load("tiny-moe", seed=0)
    shards = to_meta(llm.model.state_dict(), cfg, mp=2)
    del shards[1]["norm.weight"]
    folder = write_meta(tmp_path / "bad", cfg, shards)
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: its tensors differ .*'norm.weight'"):
        herd.load(folder)


def test_missing_and_misshapen_meta_tensors_name_the_shard(tmp_path):
    cfg = CASES["moe-top1"]
    sd = herd.load("tiny-moe", seed=0).model.state_dict()
    (fused,) = to_meta(sd, cfg, fused=True)
    del fused["layers.1.feed_forward.experts.moe_w_out_eF_D"]
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: missing tensor "
                                              r"'layers.1.feed_forward.experts.moe_w_out_eF_D'"):
        herd.load(write_meta(tmp_path / "a", cfg, [fused]))
    (fused,) = to_meta(sd, cfg, fused=True)
    fused["layers.2.attention.wqkv.weight"] = fused["layers.2.attention.wqkv.weight"][:-16]
    with pytest.raises(CheckpointError, match=r"'layers.2.attention.wqkv.weight' gives shape"):
        herd.load(write_meta(tmp_path / "b", cfg, [fused]))


def test_unreadable_shard_and_gap_in_numbering(tmp_path):
    cfg = CASES["moe-top1"]
    folder = write_meta(tmp_path / "c", cfg, [])
    (folder / "consolidated.00.pth").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="consolidated.00.pth: not a readable torch checkpoint"):
        herd.load(folder)
    (folder / "consolidated.00.pth").rename(folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth missing \(found consolidated.01.pth\)"):
        herd.load(folder)
    # A missing shard is named as the missing file.
    llm = herd.load("tiny-moe", seed=0)
    two = write_meta(tmp_path / "d", cfg, to_meta(llm.model.state_dict(), cfg, mp=2))
    (two / "consolidated.01.pth").rename(two / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth missing"):
        herd.load(two)
    (two / "consolidated.02.pth").rename(two / "consolidated.x.pth")
    with pytest.raises(CheckpointError, match="are not consolidated.00.pth"):
        herd.load(two)
