"""Tensor-parallel inference (herd.distributed) on gloo: T processes follow one process's logits,
tokens and a fixed collective count (and bytes) per step, with experts split by width or (expert
parallelism) whole, and layers split into pipeline stages; a rank keeps 1/T of the sharded weights;
sizes that cannot be split are refused."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd import kernels
from herd.config import MoEConfig
from herd.distributed import pipeline
from herd.distributed.steps import HEADER, PARTS, LeaderEngine, follow, init, stop
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
    one leaving (a row move); then an image prompt and a draft. Returns the logits and tokens of each
    phase, and collectives (and their bytes) per step."""
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
    # Image features in place of 20 tokens across a chunk boundary (on rank 0 only: sent with the plan),
    # then a prompt-lookup step: 4 tokens of one row verified in one forward.
    mask = torch.zeros(len(PROMPTS[1]), dtype=torch.bool)
    mask[5:25] = True
    features = torch.randn(20, engine.model.cfg.dim, generator=torch.Generator().manual_seed(1))
    out["logits"].append(engine.prefill(0, PROMPTS[1], mask, features)[None])
    out["logits"].append(engine.decode_drafts([[3, 1, 4, 1]])[0])
    return out


def _rows(cfg) -> int:
    return max(len(p) for p in PROMPTS) + NEW_TOKENS + 10


def _worker(rank: int, size: int, stages: int, kv_heads: int, ep: bool, fast: bool, rendezvous: str,
            result: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size * stages)
    try:
        cfg = _config(kv_heads)
        tp = dataclasses.replace(init(size, step_tokens=STEP_TOKENS, pp_size=stages), expert_parallel=ep)
        model = _model(cfg)
        if size > 1:
            shard(model, tp)
        if fast:
            kernels.apply(model)  # after shard, as steps.load does: FastMoE's paths under LocalExperts
        if stages > 1:
            pipeline.split(model, tp)
        if rank == 0:
            engine = LeaderEngine(tp, model, rows=2, max_len=_rows(cfg), prefill_chunk=STEP_TOKENS)
            out = _run(engine)
            stop(tp)
        else:
            out = {"forward_steps": follow(model, tp)}
        out["counts"] = dict(COUNTS)
        out["layers"] = len(model.layers)
        torch.save(out, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("size,stages,kv_heads,ep,fast", [
    (2, 1, 2, False, False), (2, 1, 4, False, False), (4, 1, 4, False, False),
    (2, 1, 2, True, True), (4, 1, 4, True, False),  # expert parallel: 2 experts a rank, then 1
    (1, 2, 2, False, False), (2, 2, 2, True, True),  # pipeline stages, alone and with the above
])
def test_parallel_ranks_follow_one_process(tmp_path, size, stages, kv_heads, ep, fast):
    cfg = _config(kv_heads)
    with torch.inference_mode():
        ref = _run(Engine(_model(cfg), rows=2, max_len=_rows(cfg), prefill_chunk=STEP_TOKENS))
    world = size * stages
    mp.start_processes(_worker, args=(size, stages, kv_heads, ep, fast, str(tmp_path / "rdv"), str(tmp_path / "out")),
                       nprocs=world, start_method="spawn")
    outs = [torch.load(tmp_path / f"out.{r}") for r in range(world)]
    ours = outs[0]
    assert ours["tokens"] == ref["tokens"]  # 32 greedy tokens after each prompt
    assert len(ours["logits"]) == len(ref["logits"])
    gaps = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours["logits"], ref["logits"])]
    label = f"T={size} P={stages} G={kv_heads}{' EP' if ep else ''}{' kernels' if fast else ''}"
    print(f"{label}: worst relative logit gap {max(gaps):.2e} over {len(gaps)} steps")
    assert max(gaps) <= 1e-5, gaps
    # Their bytes (float32): the plan; a [1, 1, D] hidden state each all-reduce; the logits, this rank's
    # ceil(V/T) of them gathered (P = 1), or the hidden state sent on and all V received (P > 1).
    layers = cfg.n_layers // stages
    moved = {"broadcast": 8 * (HEADER + PARTS * STEP_TOKENS), "all_reduce": 2 * layers * cfg.dim * 4 * (size > 1)}
    moved.update({"send": cfg.dim * 4, "recv": cfg.vocab_size * 4} if stages > 1 else
                 {"gather": -(-cfg.vocab_size // size) * 4})
    assert ours["bytes"] == [{k: v for k, v in moved.items() if v}] * (2 * NEW_TOKENS)
    steps = outs[1]["forward_steps"]
    assert all(o["forward_steps"] == steps for o in outs[1:])
    assert sum(o["layers"] for o in outs[::size]) == cfg.n_layers  # the stages' layers, each once
    # Each decode step: the plan's broadcast, 2 all-reduces per layer of the stage (under tensor
    # parallelism), and the logits: gathered from the ranks (P = 1), or sent on and back (P > 1).
    layers = cfg.n_layers // stages
    step = {"broadcast": 1, **({"all_reduce": 2 * layers} if size > 1 else {})}
    step.update({"send": 1, "recv": 1} if stages > 1 else {"gather": 1})
    assert ours["steps"] == [step] * (2 * NEW_TOKENS)
    # Every rank, prefill steps included: the same plans; 2 all-reduces per layer of its stage per step;
    # hidden states received from the stage before and sent to the next; the logits of the steps that
    # take some (`taken`) gathered on the last stage, whose rank 0 sends them to rank 0.
    taken = ours["counts"]["recv" if stages > 1 else "gather"]
    for r, o in enumerate(outs):
        stage, t = divmod(r, size)
        last = stage == stages - 1
        want = {"broadcast": ours["counts"]["broadcast"], "all_reduce": 2 * layers * steps * (size > 1),
                "gather": taken * (size > 1 and last),
                "send": steps * (not last) + taken * (last and t == 0 and stages > 1),
                "recv": steps * (stage > 0) + taken * (r == 0 and stages > 1)}
        assert o["counts"] == {k: v for k, v in want.items() if v}, (r, o["counts"])
    print(f"{label}: {steps} forward steps, collectives of rank 0 {ours['counts']}, "
          f"of the last {outs[-1]['counts']}")


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


@pytest.mark.parametrize("size,changes,ep,message", [
    (4, {}, False, "tensor-parallel size 4 exceeds n_kv_heads (2)"),
    (3, {"n_kv_heads": 4}, False, "n_kv_heads (4) is not divisible by the tensor-parallel size 3"),
    (2, {"ffn_dim": 129}, False, "ffn_dim (129) is not divisible"),
    (2, {"moe": MoEConfig(num_experts=4, top_k=2, expert_dim=65)}, False, "moe.expert_dim (65) is not divisible"),
    (2, {"moe": MoEConfig(num_experts=3, top_k=2, expert_dim=64)}, True,
     "moe.num_experts (3) is not divisible by the expert-parallel size 2"),
])
def test_sizes_that_cannot_be_split_are_refused_naming_the_field(size, changes, ep, message):
    cfg = tiny_text("tiny-interleaved", **{"n_heads": 8, "n_kv_heads": 2, **changes})
    with pytest.raises(ValueError, match=re.escape(message)):
        check_sizes(cfg, size, expert_parallel=ep)
    with pytest.raises(ValueError, match=re.escape(message)):  # before any weight is touched
        shard(TextModel(cfg), TensorParallel(0, size, expert_parallel=ep))
    if ep:  # split by width instead, 3 experts are fine
        check_sizes(cfg, size)


def test_pipeline_stages_need_a_layer_each():
    cfg = tiny_text("tiny-interleaved", n_heads=8, n_kv_heads=2)
    check_sizes(cfg, 2, cfg.n_layers)
    with pytest.raises(ValueError, match=re.escape(f"pipeline-parallel size {cfg.n_layers + 1} exceeds n_layers")):
        check_sizes(cfg, 1, cfg.n_layers + 1)
    with pytest.raises(ValueError, match="pipeline-parallel size must be an integer >= 1"):
        check_sizes(cfg, 1, 0)
    # Stage s holds layers [s L / P, (s + 1) L / P): every layer once, in order.
    held = [list(TensorParallel(0, 1, stage=s, stages=3).layers(cfg.n_layers)) for s in range(3)]
    assert sum(held, []) == list(range(cfg.n_layers)) and all(held)


def test_generate_tp_without_torchrun_says_how_to_run_it(capsys, monkeypatch):
    from herd.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "hi", "--tp", "2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    assert main(["generate", "hi", "--ep"]) == 2
    assert "--ep splits the experts over the --tp processes" in capsys.readouterr().err


def _python(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    """``python *args`` from the repository, under torchrun with ``nproc`` processes if given."""
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *launch, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _herd(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    return _python("-m", "herd", *args, nproc=nproc)


@pytest.mark.slow
def test_herd_generate_under_torchrun_prints_one_process_reply():
    args = ["generate", "Tell me about cows", "--max-new-tokens", "32"]
    one = _herd(*args)
    two = _herd(*args, "--tp", "2", nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and len(one.stdout) > 40  # printed once, by rank 0: the same greedy tokens
    counted = re.search(r"herd: \d+ tokens", one.stderr).group()
    assert two.stderr.count(counted) == 1, two.stderr[-3000:]
    stages = _herd(*args, "--pipeline-parallel-size", "2", nproc=2)
    assert stages.returncode == 0 and stages.stdout == one.stdout, stages.stderr[-3000:]
    whole = _herd(*args, "--tp", "2", "--enable-expert-parallel", nproc=2)  # herd-tiny: 4 of its 8 experts a rank
    assert whole.returncode == 0 and whole.stdout == one.stdout, whole.stderr[-3000:]
    quantized = [_herd(*args, "--quantize", "int4", *more, nproc=n) for more, n in [([], 0), (["--tp", "2"], 2)]]
    assert quantized[1].returncode == 0 and quantized[1].stdout == quantized[0].stdout, quantized[1].stderr[-3000:]
    refused = _herd("generate", "hi", "--tensor-parallel-size", "4", nproc=4)  # herd-tiny has 2 KV heads
    assert refused.returncode != 0 and "exceeds n_kv_heads (2)" in refused.stderr


def test_ctrl_c_during_a_step_lands_after_it():
    """A step left halfway would leave the other ranks in its collectives: SIGINT waits for its end."""
    import signal

    from herd.distributed.steps import _whole_step

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _whole_step():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here, and only noted
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


PREFIX_CACHE = """
import sys, torch, torch.distributed as dist
from PIL import Image
from herd.distributed import steps
from herd.engine.batch import Batcher, Job
from herd.engine.generate import Engine, Sampling
from herd.engine.prefix import PrefixCache

def prompts(llm):
    shared = llm.tokenizer.encode("The llama walked up the hill and saw the sun " * 8, bos=True)
    texts = [llm.prepare(shared[:n] + llm.tokenizer.encode(tail))
             for n, tail in [(13, " yes"), (13, " no bird"), (40, " a"), (40, " b"), (23, "")]]
    others = [llm.prepare(llm.tokenizer.encode(f"{i} " * 15, bos=True)) for i in range(4)]  # evictions
    image = Image.open(sys.argv[3]).convert("RGB")
    chats = [llm.prepare([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": q}]}]) for q in ("How many?", "Colour?")]
    return texts[:2] + others + texts[2:] + chats

def run(llm, engine, prefixes):
    batcher, out = Batcher(engine, llm.tokenizer, prefixes=prefixes), []
    for p in prompts(llm):
        job = Job(list(p.ids), 8, Sampling(), image_mask=p.image_mask, image_features=p.image_features)
        batcher.add(job)
        while batcher.seats:
            batcher.step()
        out.append(job.token_ids)
    return out

if sys.argv[1] == "one":
    import herd
    llm = herd.load("tiny-interleaved", progress=False)
    torch.save({"tokens": run(llm, Engine(llm.model, rows=2, max_len=256), None)}, sys.argv[4])
    sys.exit()
llm, tp = steps.load("tiny-interleaved", int(sys.argv[1]), pp_size=int(sys.argv[2]), progress=False)
if tp.leader:
    try:
        engine = llm.engine(llm.model, rows=2, max_len=256)
        cache = PrefixCache(int(2.5 * engine.cache.snapshot_bytes(60)))
        tokens = run(llm, engine, cache)
        torch.save({"tokens": tokens, "hits": cache.hits, "reused": cache.reused_tokens, "held": len(cache.entries),
                    "bytes": cache.bytes, "budget": cache.budget}, sys.argv[4])
    finally:
        steps.stop(tp)
else:
    steps.follow(llm.model, tp)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("size,stages", [(2, 2)])
def test_prefix_cache_under_parallel_ranks_gives_cold_tokens(tmp_path, size, stages):
    """Rank 0's prefix cache decides; every rank saves, restores and forgets its own part of each
    snapshot by the plans (SAVE, RESTORE, FORGET). Greedy tokens equal one process without a cache,
    for prefixes ending before and after attention chunks, with images, through evictions."""
    script = tmp_path / "prefix_cache.py"
    script.write_text(PREFIX_CACHE)
    image = REPO / "examples" / "shapes.png"
    one = _python(str(script), "one", "1", str(image), str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr[-3000:]
    run = _python(str(script), str(size), str(stages), str(image), str(tmp_path / "split.pt"), nproc=size * stages)
    assert run.returncode == 0, run.stderr[-3000:]
    got, want = torch.load(tmp_path / "split.pt"), torch.load(tmp_path / "one.pt")
    print(f"T={size} P={stages}: {got['hits']} hits, {got['reused']} tokens reused, {got['held']} of "
          f"{len(want['tokens'])} prompts held in {got['bytes']} of {got['budget']} bytes")
    assert got["tokens"] == want["tokens"]
    assert got["hits"] >= 3 and got["reused"] > 40, got  # the 13-, 40- and image-sharing prompts
    assert got["bytes"] <= got["budget"] and got["held"] < len(want["tokens"]), got  # some were evicted


SPLIT_LOGITS = """
import sys, torch, torch.distributed as dist
from herd.distributed import steps
from herd.images import load_image

llm, tp = steps.load("herd-tiny", int(sys.argv[1]), pp_size=int(sys.argv[2]), progress=False,
                     quantize=sys.argv[5] if len(sys.argv) > 5 else None)
if tp.leader:
    try:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": sys.argv[3]}, {"type": "text", "text": "Hi"}]}])
        torch.save({"image": llm.logits(prompt), "text": llm.logits([[1, 5, 9, 2], [7, 3, 8, 4]])}, sys.argv[4])
    finally:
        steps.stop(tp)
else:
    steps.follow(llm.model, tp)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("size,stages,quantize", [(2, 1, None), (1, 2, None), (2, 2, "int4")])
def test_logits_of_a_split_model_equal_one_process(tmp_path, size, stages, quantize):
    """`llm.logits` on rank 0 runs through the planned steps (a full forward would wait for the other ranks).
    Quantized while loading, each rank holds exactly its part of the integers and scales one process
    holds (tests/test_load_slices.py checks int8 and int4 part by part)."""
    import herd

    image = REPO / "examples" / "shapes.png"
    script = tmp_path / "split_logits.py"
    script.write_text(SPLIT_LOGITS)
    out = tmp_path / "logits.pt"
    run = _python(str(script), str(size), str(stages), str(image), str(out), *([quantize] if quantize else []),
                  nproc=size * stages)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    llm = herd.load("herd-tiny", progress=False, quantize=quantize)
    with torch.inference_mode():
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Hi"}]}])
        want = {"image": llm.logits(prompt), "text": llm.logits([[1, 5, 9, 2], [7, 3, 8, 4]])}
    for key in want:
        assert got[key].shape == want[key].shape
        gap = ((got[key] - want[key]).abs().max() / want[key].abs().max()).item()
        print(f"T={size} P={stages} {quantize or 'float32'} {key}: largest logit gap {gap:.1e} of the largest logit")
        assert gap < 1e-5, (key, gap)
