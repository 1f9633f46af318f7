"""Tensor-parallel inference (herd.distributed) on gloo: T processes follow one process's logits,
tokens and a fixed collective count (and bytes) per step; a rank keeps 1/T of the sharded weights;
sizes that cannot be split are refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.config import MoEConfig
from herd.distributed.steps import LeaderEngine, follow, stop
from herd.distributed.tensor import BYTES, COUNTS, TensorParallel, check_sizes, shard
from herd.engine.generate import Engine
from herd.model.transformer import TextModel
from tests.conftest import randomize, tiny_text

REPO = Path(__file__).resolve().parents[1]
STEP_TOKENS = 64
NEW_TOKENS = 32
# Shorter than an attention chunk (16), and 2.5 chunks long: chunk boundaries inside prefill and decode.
PROMPTS = [[1, 5, 9, 2, 7, 3, 8], [(7 * i + 3) % 1001 for i in range(40)]]


def _config(kv_heads: int):
    # Interleaved MoE (top-2) with QK-norm, chunk 16, temperature tuning from position 3 (floor_scale 4);
    # a vocabulary that no T divides, so the head's last slice is padded.
    return tiny_text("tiny-interleaved", n_heads=8, n_kv_heads=kv_heads, attention_chunk_size=16, vocab_size=1001)


def _model(cfg) -> TextModel:
    torch.manual_seed(0)
    return randomize(TextModel(cfg), seed=0, std=0.2)


def _run(engine: Engine) -> dict:
    """Every prompt position's logits, then NEW_TOKENS greedy decode steps; then two rows side by side,
    one leaving (a row move). Returns the logits and tokens of each phase, and collectives per step."""
    out = {"logits": [], "tokens": [], "steps": [], "bytes": []}
    for prompt in PROMPTS:
        logits = engine.prefill_logits(0, prompt)
        out["logits"].append(logits)
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(logits[-1].argmax()))
            before, sent = COUNTS.copy(), BYTES.copy()
            logits = engine.decode([tokens[-1]])
            out["steps"].append(dict(COUNTS - before))
            out["bytes"].append(dict(BYTES - sent))
            out["logits"].append(logits)
        out["tokens"].append(tokens)
    engine.cache.lengths = [0] * engine.cache.rows
    both = engine.prefill_rows(0, [(PROMPTS[1], None, None), (PROMPTS[0], None, None)])
    out["logits"].append(both)
    for _ in range(4):
        both = engine.decode(both.argmax(-1).tolist())
        out["logits"].append(both)
    engine.move_row(1, 0)  # row 0 finished: row 1 takes its place
    one = both[1:]
    for _ in range(4):
        one = engine.decode(one.argmax(-1).tolist())
        out["logits"].append(one)
    return out


def _rows(cfg) -> int:
    return max(len(p) for p in PROMPTS) + NEW_TOKENS + 10


def _worker(rank: int, size: int, kv_heads: int, rendezvous: str, result: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        cfg = _config(kv_heads)
        tp = TensorParallel(rank, size, step_tokens=STEP_TOKENS)
        model = shard(_model(cfg), tp)
        if rank == 0:
            engine = LeaderEngine(tp, model, rows=2, max_len=_rows(cfg), prefill_chunk=STEP_TOKENS)
            out = _run(engine)
            stop(tp)
        else:
            out = {"forward_steps": follow(model, tp)}
        out["counts"] = dict(COUNTS)
        torch.save(out, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("size,kv_heads", [(2, 2), (2, 4), (4, 4)])
def test_tensor_parallel_follows_one_process(tmp_path, size, kv_heads):
    cfg = _config(kv_heads)
    with torch.inference_mode():
        ref = _run(Engine(_model(cfg), rows=2, max_len=_rows(cfg), prefill_chunk=STEP_TOKENS))
    mp.start_processes(_worker, args=(size, kv_heads, str(tmp_path / "rdv"), str(tmp_path / "out")), nprocs=size,
                       start_method="spawn")
    outs = [torch.load(tmp_path / f"out.{r}") for r in range(size)]
    ours = outs[0]
    assert ours["tokens"] == ref["tokens"]  # 32 greedy tokens after each prompt
    assert len(ours["logits"]) == len(ref["logits"])
    gaps = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours["logits"], ref["logits"])]
    print(f"T={size} G={kv_heads}: worst relative logit gap {max(gaps):.2e} over {len(gaps)} steps")
    assert max(gaps) <= 1e-5, gaps
    # Each decode step: the plan's broadcast, 2 all-reduces per layer, the head's gather; nothing else.
    assert ours["steps"] == [{"broadcast": 1, "all_reduce": 2 * cfg.n_layers, "gather": 1}] * (2 * NEW_TOKENS)
    # Their bytes (float32): a [1, 1, D] hidden state each all-reduce, this rank's ceil(V/T) logits, the plan.
    moved = {"broadcast": 8 * (8 + 3 * STEP_TOKENS), "all_reduce": 2 * cfg.n_layers * cfg.dim * 4,
             "gather": -(-cfg.vocab_size // size) * 4}
    assert ours["bytes"] == [moved] * (2 * NEW_TOKENS)
    # Every rank issued the same collectives; prefill steps too: 2 all-reduces per layer per step.
    assert all(o["counts"] == ours["counts"] for o in outs)
    steps = outs[1]["forward_steps"]
    assert all(o["forward_steps"] == steps for o in outs[1:])
    assert ours["counts"]["all_reduce"] == 2 * cfg.n_layers * steps
    print(f"T={size} G={kv_heads}: {steps} forward steps, collectives per rank {ours['counts']}")


def _tensor_bytes(model: TextModel) -> dict[str, int]:
    return {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("size", [2, 4])
def test_a_rank_keeps_one_tth_of_the_sharded_weights(size):
    """Measured on a sharded model's tensors (slicing issues no collective): every rank keeps all
    replicated bytes and 1/T of the rest, the head's zero-padded last rows aside."""
    cfg = _config(4)
    whole = _tensor_bytes(_model(cfg))
    ranks = [_tensor_bytes(shard(_model(cfg), TensorParallel(r, size))) for r in range(size)]
    assert all(set(state) == set(whole) for state in ranks)
    sharded = {n for n in whole if ranks[0][n] != whole[n]}
    replicated = sum(whole[n] for n in whole if n not in sharded)
    assert "output.weight" in sharded and "tok_embeddings.weight" not in sharded and replicated > 0
    head_rows = -(-cfg.vocab_size // size)
    split = sum(whole[n] for n in sharded) - whole["output.weight"]
    for state in ranks:
        assert sum(state[n] for n in whole if n not in sharded) == replicated
        assert sum(state[n] for n in sharded) == split // size + head_rows * cfg.dim * 4


@pytest.mark.slow
def test_distributed_benchmark_runs_on_gloo():
    """benchmarks/distributed.py --quick: T=2 against one process, collectives and bytes per step, the
    Scout / Maverick memory table (its NCCL path needs GPUs)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "distributed.py"), "--quick"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # 2 layers: 4 all-reduces a step, one plan, one gather of the logits.
    assert "decode step, collectives of rank 0: all_reduce 4, broadcast 1, gather 1" in out.stdout
    assert "NCCL (--device cuda): not run here" in out.stdout
    assert re.search(r"maverick +int4 +8 ", out.stdout)


@pytest.mark.parametrize("size,changes,message", [
    (4, {}, "tensor-parallel size 4 exceeds n_kv_heads (2)"),
    (3, {"n_kv_heads": 4}, "n_kv_heads (4) is not divisible by the tensor-parallel size 3"),
    (2, {"ffn_dim": 129}, "ffn_dim (129) is not divisible"),
    (2, {"moe": MoEConfig(num_experts=4, top_k=2, expert_dim=65)}, "moe.expert_dim (65) is not divisible"),
])
def test_sizes_that_cannot_be_split_are_refused_naming_the_field(size, changes, message):
    cfg = tiny_text("tiny-interleaved", **{"n_heads": 8, "n_kv_heads": 2, **changes})
    with pytest.raises(ValueError, match=re.escape(message)):
        check_sizes(cfg, size)
    with pytest.raises(ValueError, match=re.escape(message)):  # before any weight is touched
        shard(TextModel(cfg), TensorParallel(0, size))


def test_generate_tp_without_torchrun_says_how_to_run_it(capsys, monkeypatch):
    from herd.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "hi", "--tp", "2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def _herd(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *launch, "-m", "herd", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_herd_generate_under_torchrun_prints_one_process_reply():
    args = ["generate", "Tell me about cows", "--max-new-tokens", "32"]
    one = _herd(*args)
    two = _herd(*args, "--tp", "2", nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and len(one.stdout) > 40  # printed once, by rank 0: the same 32 greedy tokens
    assert "herd: 32 tokens" in two.stderr
    refused = _herd("generate", "hi", "--tensor-parallel-size", "4", nproc=4)  # herd-tiny has 2 KV heads
    assert refused.returncode != 0 and "exceeds n_kv_heads (2)" in refused.stderr
