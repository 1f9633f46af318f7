"""herd train: packing exactness, the fused loss, pretraining + bitwise resume, kill-safe checkpoints,
LoRA (merge, adapters, transformers export), FSDP2 + expert parallel on gloo, config errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import herd
from herd.config import PRESETS
from herd.model.init import init_weights
from herd.model.lora import add_adapters
from herd.model.transformer import TextModel
from herd.train.loss import LinearCrossEntropy, summed_loss
from herd.train.config import TrainConfigError, describe_fields, load_config
from herd.train.data import DataError, pack
from herd.train.trainer import Trainer
from tests.conftest import assert_logits_close
from tests.corpus import corpus

REPO = Path(__file__).resolve().parents[1]
QA = [("Who found the silver key?", "The old farmer found it."), ("What did the baker sell?", "Warm bread."),
      ("Where is the white horse?", "By the sea."), ("Who built the stone bridge?", "My brother did."),
      ("What did the red fox follow?", "The long road."), ("When did the queen return?", "After the rain."),
      ("Who lost the map?", "A small dog."), ("What did the sailor paint?", "The green door.")]


def write_config(folder: Path, text: str) -> Path:
    path = folder / "train.toml"
    path.write_text(textwrap.dedent(text))
    return path


PRETRAIN = """
    job = "pretrain"
    out_dir = "{out}"
    [model]
    preset = "tiny-moe"
    vision = false
    [data]
    train = ["corpus.txt"]
    seq_len = 64
    [optim]
    lr = 3e-3
    warmup_steps = 10
    [train]
    steps = {steps}
    micro_batch = 2
    eval_every = 100
    eval_rows = 16
    save_every = {save_every}
    progress = false
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    (d / "corpus.txt").write_text(corpus(300, seed=1))
    yield d
    shutil.rmtree(d, ignore_errors=True)  # ~6 GB of checkpoints: gone once this module's tests are done


@pytest.fixture(scope="module")
def pretrained(workdir):
    """An uninterrupted 200-step pretraining run (checkpoints at 100 and 200)."""
    cfg = load_config(write_config(workdir, PRETRAIN.format(out="full", steps=200, save_every=100)))
    final = Trainer(cfg).run()
    return workdir / "full", final


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    """The training loss of every step (rows without one hold only a held-out evaluation)."""
    return [r["loss"] for r in metrics(run) if "loss" in r]


# ---- exactness -------------------------------------------------------------------------------


def test_packed_rows_compute_each_document_alone():
    """Doc masks + per-document positions: a packed row's logits equal each document's own forward,
    across several attention chunks (8) and where the NoPE temperature is active (positions >= 4)."""
    cfg = PRESETS["tiny-moe"].text
    model = init_weights(TextModel(cfg), seed=3, std=0.3).eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 1000, (n,), generator=gen) for n in (29, 20, 11)]
    tokens = torch.cat(docs + [torch.zeros(4, dtype=torch.long)])[None]  # 4 padding tokens at the end
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((4,), -1)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs] + [torch.arange(4)])[None]
    with torch.no_grad():
        packed = model(tokens, segments_BT=segments, positions_BT=positions)
        at = 0
        for d in docs:
            alone = model(d[None])
            assert_logits_close(packed[:, at:at + len(d)], alone, rel=1e-5)
            at += len(d)


def test_packed_rows_train_as_each_document_alone():
    """The gradient of a packed batch (two rows, documents split across attention chunks, spans of
    several padded lengths, padding) is the sum of the documents' own gradients."""
    cfg = PRESETS["tiny-moe"].text
    model = init_weights(TextModel(cfg), seed=4, std=0.3)
    gen = torch.Generator().manual_seed(1)
    rows = [[37, 5, 16], [70, 1, 8]]  # token counts; each row padded to 80
    docs = [[torch.randint(0, 1000, (n,), generator=gen) for n in row] for row in rows]
    T = 80

    def row(parts, fill):
        return torch.cat(parts + [torch.full((T - sum(len(p) for p in parts),), fill)])

    tokens = torch.stack([row(r, 0) for r in docs])
    segments = torch.stack([row([torch.full((len(d),), i) for i, d in enumerate(r)], -1) for r in docs])
    positions = torch.stack([row([torch.arange(len(d)) for d in r], 0) for r in docs])
    targets = torch.stack([row([torch.cat([d[1:], torch.tensor([-100])]) for d in r], -100) for r in docs])
    model.zero_grad()
    summed_loss(model, tokens, targets, segments_BT=segments, positions_BT=positions).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for d in (d for r in docs for d in r if len(d) > 1):
        summed_loss(model, d[None], torch.cat([d[1:], torch.tensor([-100])])[None]).backward()
    for n, p in model.named_parameters():  # float32 sums in another order: 1e-5 of the tensor's largest
        if n in packed:
            gap = float((packed[n] - p.grad).abs().max() / p.grad.abs().max())
            assert gap < 2e-5, f"{n}: {gap:.2e}"


@pytest.mark.parametrize("chunk", [None, 8])
def test_packed_attention_keeps_spans_inside_rows_and_documents(chunk):
    """Edge cases of `packing`: a row that opens mid-document (positions not from 0, mid-chunk), a
    document id reused in the next row, a one-token document, padding between documents, a span longer
    than the granule. Real tokens get exactly what a dense mask gives (same row, same document, causal,
    same chunk of positions)."""
    from herd.model.attention import attend_packed, packing
    gen = torch.Generator().manual_seed(3)
    seg = torch.tensor([[0] * 13 + [1] * 20 + [-1] * 3 + [2] + [-1] * 3,
                        [0] * 25 + [-1] * 2 + [1] * 10 + [-1] * 3])
    pos = torch.tensor([list(range(5, 18)) + list(range(20)) + [0] * 3 + [0] + [0] * 3,
                        list(range(25)) + [0] * 2 + list(range(10)) + [0] * 3])
    B, T, H, G, Dh = 2, 40, 4, 2, 8
    q, k, v = (torch.randn(B, T, n, Dh, generator=gen) for n in (H, G, G))
    out = attend_packed(q, k, v, packing(seg, pos, chunk, granule=4), gqa=True)
    idx = torch.arange(T)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :] <= idx[:, None])
    if chunk is not None:
        allowed &= (pos[:, :, None] // chunk) == (pos[:, None, :] // chunk)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed[:, None], enable_gqa=True).transpose(1, 2)
    real = seg >= 0
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-6)
    assert not out[~real].any()  # padding reads the zero row


@pytest.mark.parametrize("lora", [False, True])
def test_linear_cross_entropy_matches_autograd(lora):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1100, 24, generator=gen, requires_grad=True)
    w = torch.randn(300, 24, generator=gen, requires_grad=True)
    t = torch.randint(0, 300, (1100,), generator=gen)
    extra = (torch.randn(4, 24, generator=gen, requires_grad=True),
             torch.randn(300, 4, generator=gen, requires_grad=True), 0.5) if lora else ()
    ours = LinearCrossEntropy.apply(h, w, t, *extra)
    (ours * 0.3).backward()
    leaves = [h, w] + list(extra[:2])
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    logits = h @ w.t() + ((h @ extra[0].t()) @ extra[1].t() * extra[2] if lora else 0)
    ref = F.cross_entropy(logits, t, reduction="sum")
    (ref * 0.3).backward()
    assert abs(float(ours.detach()) - float(ref.detach())) <= 1e-5 * abs(float(ref.detach()))
    for g, x in zip(got, leaves):
        assert torch.allclose(g, x.grad, rtol=1e-4, atol=1e-5)


def test_packing_covers_every_target_once_and_is_seeded():
    lengths = np.array([5, 300, 64, 65, 1, 130, 7])
    plan = pack(lengths, np.arange(len(lengths)), 64, order_seed=0)
    seen = {}
    for r in range(len(plan)):
        segs = plan.segments(r)
        assert sum(n for _, _, n in segs) <= 64
        for d, s, n in segs:
            for i in range(s + 1, s + n):  # tokens predicted inside this piece
                seen[(d, i)] = seen.get((d, i), 0) + 1
    expected = {(d, i) for d, n in enumerate(lengths) if n >= 2 for i in range(1, n)}
    assert set(seen) == expected and set(seen.values()) == {1}
    again = pack(lengths, np.arange(len(lengths)), 64, order_seed=0)
    other = pack(lengths, np.arange(len(lengths)), 64, order_seed=1)
    assert np.array_equal(plan.doc, again.doc) and not np.array_equal(plan.doc, other.doc)
    with pytest.raises(DataError, match="document 1: 300 tokens with images"):
        pack(lengths, np.arange(len(lengths)), 64, order_seed=0, unsplittable={1})


def test_data_shuffle_false_trains_in_file_order(tmp_path):
    """A curriculum written in order (herd-tiny's warm-up block) is trained in that order."""
    (tmp_path / "docs.txt").write_text("\n\n".join(f"document number {i} " * (3 + i % 5) for i in range(400)))
    path = tmp_path / "c.toml"
    path.write_text("out_dir = 'o'\n[model]\npreset = 'tiny-dense'\n[data]\ntrain = ['docs.txt']\nseq_len = 32\n"
                    "val_fraction = 0\n[train]\nprogress = false\n")
    orders = {}
    for shuffle in (True, False):
        data = Trainer(load_config(path, [f"data.shuffle={str(shuffle).lower()}"])).train_data
        orders[shuffle] = {d: r for r in reversed(range(data.rows_per_epoch)) for d, _, _ in data.row(r)}
    assert sorted(orders[True]) == sorted(orders[False]) == list(range(400))
    # Best-fit packing keeps up to 64 rows open, so the order holds for the bulk, not for every document.
    for order, kept in ((orders[False], True), (orders[True], False)):
        early, late = (np.mean([order[d] for d in range(a, a + 100)]) for a in (0, 300))
        assert (early < 0.5 * late) == kept, (early, late)


def test_output_projections_start_scaled_unless_the_recipe_says_not(tmp_path):
    """model.scale_output_init: wo and w2 at init_std / sqrt(2 * n_layers) (GPT-2), or at init_std."""
    (tmp_path / "docs.txt").write_text("a few words " * 50)
    path = tmp_path / "c.toml"
    path.write_text("out_dir = 'o'\n[model]\npreset = 'tiny-dense'\ninit_std = 0.05\n[data]\ntrain = ['docs.txt']\n"
                    "val_fraction = 0\n[train]\nprogress = false\n")
    for scaled in (True, False):
        model = Trainer(load_config(path, [f"model.scale_output_init={str(scaled).lower()}"])).model
        n_layers = model.cfg.n_layers
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "w2.weight", "attention.wq.weight", "w1.weight")):
                out = name.endswith(("wo.weight", "w2.weight"))
                want = 0.05 / math.sqrt(2 * n_layers) if out and scaled else 0.05
                assert abs(p.std().item() / want - 1) < 0.1, (scaled, name, p.std().item(), want)


def test_assistant_mask_marks_only_what_the_assistant_wrote():
    tok = herd.load("tiny-dense").tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                                  add_generation_prompt=False)
    learned = [i for i, m in zip(ids.ids, ids.assistant_mask) if m]
    assert tok.decode(learned) == "Hello.<|eot|>"


# ---- pretraining, resume, checkpoints ----------------------------------------------------------


@pytest.mark.slow
def test_pretraining_lowers_held_out_loss(pretrained):
    run, final = pretrained
    rows = metrics(run)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 100, 200]
    assert evals[-1]["eval_loss"] <= 0.7 * evals[0]["eval_loss"], evals
    assert (run / "loss.png").stat().st_size > 1000
    assert all(len(counts) == 4 for counts in (r["expert_tokens"][0] for r in rows if "expert_tokens" in r))
    llm = herd.load(final, progress=False)  # the export loads and generates
    assert llm.generate("The old", max_new_tokens=4).token_ids


@pytest.mark.slow
def test_resume_from_step_100_repeats_the_run_bitwise(pretrained, workdir):
    run, _ = pretrained
    resumed = workdir / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-000100", resumed / "checkpoints" / "step-000100")
    (resumed / "checkpoints" / "latest").write_text("step-000100")
    cfg = load_config(write_config(workdir, PRETRAIN.format(out="resumed", steps=200, save_every=100)))
    trainer = Trainer(cfg)
    assert trainer.step == 100
    trainer.run()
    full = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r and r["step"] > 100}
    again = {r["step"]: r["loss"] for r in metrics(resumed) if "loss" in r and r["step"] > 100}
    assert len(full) == 100 and again == full  # bitwise: the same float64 of every step


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_the_previous_one(workdir):
    out = workdir / "killed"
    config = write_config(workdir, PRETRAIN.format(out="killed", steps=6, save_every=2))
    script = textwrap.dedent(f"""
        import os, signal
        from herd.train import resume
        from herd.train.config import load_config
        from herd.train.trainer import train
        real = resume._write
        def dying(path, write):
            if "step-000004" in str(path) and "optimizer" in path.name:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-save: model file written, optimizer not
            real(path, write)
        resume._write = dying
        train(load_config({str(config)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert (out / "checkpoints" / "step-000004.partial").exists()  # the interrupted save, never pointed at
    trainer = Trainer(load_config(config))  # resumes from step 2, cleaning up the partial save
    assert trainer.step == 2 and not (out / "checkpoints" / "step-000004.partial").exists()
    assert trainer.run() is not None
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ---- LoRA --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_learns_merges_and_exports(pretrained, workdir):
    from transformers import Llama4ForCausalLM

    _, base = pretrained
    with open(workdir / "sft.jsonl", "w") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    config = write_config(workdir, f"""
        job = "lora"
        out_dir = "lora"
        [model]
        checkpoint = "{base}"
        [data]
        train = ["sft.jsonl"]
        val_fraction = 0
        seq_len = 64
        [optim]
        lr = 5e-3
        warmup_steps = 5
        weight_decay = 0.0
        [train]
        steps = 90
        micro_batch = 8
        eval_every = 0
        save_every = 0
        progress = false
        [moe]
        aux_loss = 0.0
        [lora]
        rank = 16
        targets = ["attention", "shared_expert", "experts", "output"]
    """)
    cfg = load_config(config)
    trainer = Trainer(cfg)
    merged_dir = trainer.run()
    rows = metrics(workdir / "lora")
    assert rows[-1]["loss"] <= 0.1, rows[-1]

    # base + adapters (unmerged, as trained) vs the merged export vs herd.load(..., adapters=)
    unmerged = herd.load(base, progress=False)
    add_adapters(unmerged.model, 16, cfg.lora.alpha, cfg.lora.targets)
    unmerged.model.load_state_dict({k: v for k, v in trainer.model.state_dict().items() if ".adapter." in k},
                                   strict=False)
    merged = herd.load(merged_dir, progress=False)
    loaded = herd.load(base, progress=False, adapters=workdir / "lora" / "adapters")
    ids = [merged.tokenizer.apply_chat_template([{"role": "user", "content": q}]).ids + merged.tokenizer.encode(a)
           for q, a in QA[:2]]
    for row in ids:
        expected = unmerged.logits([row])
        assert (merged.logits([row]) - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-5
        assert (loaded.logits([row]) - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-5
        ref = Llama4ForCausalLM.from_pretrained(merged_dir).eval()
        with torch.no_grad():
            assert_logits_close(merged.logits([row]), ref(torch.tensor([row])).logits)
    # The fine-tuned model answers from the set, through the user-facing generate
    out = merged.generate([{"role": "user", "content": QA[0][0]}], max_new_tokens=12)
    assert out.text == QA[0][1]


@pytest.mark.slow
def test_qlora_on_an_int4_base_learns_and_exports_a_plain_model(tmp_path):
    """QLoRA: herd-tiny's experts, shared experts and attention in int4 (frozen), adapters in float32.
    The loss falls; final/ is the dequantized base with the adapters merged, a plain float32 checkpoint
    that herd and transformers load with the logits of the model as trained."""
    from transformers import Llama4ForCausalLM

    from herd.kernels.quant import QuantExperts, QuantLinear

    with open(tmp_path / "sft.jsonl", "w") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    config = write_config(tmp_path, """
        job = "lora"
        out_dir = "qlora"
        [model]
        checkpoint = "herd-tiny"
        vision = false
        quantize = "int4"
        quantize_group = 128
        quantize_modules = ["experts", "shared_expert", "attention"]
        [data]
        train = ["sft.jsonl"]
        val_fraction = 0
        seq_len = 64
        [optim]
        lr = 5e-3
        warmup_steps = 5
        weight_decay = 0.0
        [train]
        steps = 40
        micro_batch = 8
        eval_every = 0
        save_every = 0
        progress = false
        [moe]
        aux_loss = 0.0
        [lora]
        rank = 16
        targets = ["attention", "shared_expert", "experts", "output"]
    """)
    trainer = Trainer(load_config(config))
    kinds = {type(m) for m in trainer.model.modules()}
    assert QuantExperts in kinds and QuantLinear in kinds  # the base really is int4 while it trains
    assert all(".adapter." in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    merged_dir = trainer.run()
    steps = losses(tmp_path / "qlora")
    print(f"QLoRA int4 loss: first {steps[0]:.4f}, last {steps[-1]:.4f}")
    assert steps[-1] <= 0.02 * steps[0], steps

    merged = herd.load(merged_dir, progress=False)
    assert merged.dtype == torch.float32 and not any(isinstance(m, (QuantExperts, QuantLinear))
                                                     for m in merged.model.modules())
    ref = Llama4ForCausalLM.from_pretrained(merged_dir).eval()
    trainer.model.eval()
    for q, a in QA[:2]:
        row = merged.tokenizer.apply_chat_template([{"role": "user", "content": q}]).ids + merged.tokenizer.encode(a)
        with torch.no_grad():
            as_trained = trainer.model(torch.tensor([row]))  # int4 base + adapters, unmerged
            theirs = ref(torch.tensor([row])).logits
        ours = merged.logits([row])
        assert (ours - as_trained).abs().max() <= 1e-5 * as_trained.abs().max() + 1e-5
        gap = assert_logits_close(ours, theirs)
        print(f"merged export, herd vs transformers: max |Δlogit| {float((ours - theirs).abs().max()):.3g} "
              f"(relative {gap:.3g})")
    out = merged.generate([{"role": "user", "content": QA[0][0]}], max_new_tokens=12)
    assert out.text == QA[0][1]
    trainer.cfg.lora.merge = False  # the adapters alone, without building a full-precision model
    assert trainer.export() == tmp_path / "qlora" / "adapters"
    assert (tmp_path / "qlora" / "adapters" / "adapter_model.safetensors").is_file()


def test_bad_adapter_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a herd adapter folder"):
        herd.load("tiny-dense", adapters=tmp_path)


# ---- scale-out ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_fsdp_and_expert_parallel_follow_one_process(workdir):
    base = PRETRAIN.format(out="{out}", steps=50, save_every=0).replace("micro_batch = 2", "micro_batch = 1")
    single = write_config(workdir, base.replace("{out}", "one"))
    Trainer(load_config(single, ["train.grad_accum=2", "train.eval_every=0"])).run()
    two = workdir / "two.toml"
    two.write_text(textwrap.dedent(base.replace("{out}", str(workdir / "two"))).replace(
        'train = ["corpus.txt"]', f'train = ["{workdir / "corpus.txt"}"]'))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "herd",
                           "train", str(two), "--set", "train.eval_every=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [r["loss"] for r in metrics(workdir / "one")]
    b = [r["loss"] for r in metrics(workdir / "two")]
    assert len(a) == len(b) == 50
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst <= 1e-3, worst
    assert a[-1] < 0.8 * a[0]
    # The sharded run exports the same kind of model (experts re-joined from both ranks).
    sd = herd.load(workdir / "two" / "final", progress=False).model.state_dict()
    assert sd["layers.0.feed_forward.experts.w1"].shape[0] == 4


def _torchrun(config: Path, *overrides: str, stop_after: int | None = None) -> None:
    args = [arg for o in overrides for arg in ("--set", o)] + ([] if stop_after is None else ["--stop-after", str(stop_after)])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "herd",
                           "train", str(config), *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_tensor_parallel_follows_one_process_and_resumes_exactly(workdir):
    """2 processes, one tensor-parallel group (DTensor: heads, FFN and every expert's width split):
    the same losses as one process, and a run stopped at step 10 resumes to the same steps 11-20."""
    base = PRETRAIN.format(out="{out}", steps=20, save_every=10).replace("micro_batch = 2", "micro_batch = 1")
    Trainer(load_config(write_config(workdir, base.replace("{out}", "tp-one")))).run()
    tp = workdir / "tp.toml"
    tp.write_text(textwrap.dedent(base.replace("{out}", "set-below")).replace(
        'train = ["corpus.txt"]', f'train = ["{workdir / "corpus.txt"}"]'))
    sets = ["distributed.tensor_parallel=2", "distributed.expert_parallel=false"]  # held-out loss at 0 and 20
    _torchrun(tp, *sets, f"out_dir={workdir / 'tp-full'}")
    a, b = losses(workdir / "tp-one"), losses(workdir / "tp-full")
    assert len(a) == len(b) == 20
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst <= 1e-5, worst
    evals = [[r["eval_loss"] for r in metrics(workdir / run) if "eval_loss" in r] for run in ("tp-one", "tp-full")]
    assert len(evals[0]) == len(evals[1]) == 2 and max(abs(x - y) / x for x, y in zip(*evals)) <= 1e-5, evals
    _torchrun(tp, *sets, f"out_dir={workdir / 'tp-resumed'}", stop_after=10)
    assert len(losses(workdir / "tp-resumed")) == 10
    _torchrun(tp, *sets, f"out_dir={workdir / 'tp-resumed'}")
    assert losses(workdir / "tp-resumed") == b  # bitwise, steps 11-20 included
    # The export holds whole tensors (the ranks' slices joined): the same model as one process's.
    one = herd.load(workdir / "tp-one" / "final", progress=False).model.state_dict()
    two = herd.load(workdir / "tp-full" / "final", progress=False).model.state_dict()
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4


# ---- bad input ---------------------------------------------------------------------------------


_BASE = "[model]\npreset = 'tiny-moe'\n[data]\ntrain = ['x.txt']\n"
_QLORA = "job = 'lora'\n[data]\ntrain = ['x.txt']\n[model]\ncheckpoint = 'm'\nquantize = 'int4'\n"


@pytest.mark.parametrize("text, message", [
    ("learning_rate = 1\n" + _BASE, "learning_rate: unknown key"),
    (_BASE + "[optim]\nlr = 'fast'\n", "optim.lr: expected float, got str"),
    (_BASE + "[optim]\nlr = -1\n", "optim.lr: must be > 0"),
    (_BASE + "[train]\nsteps = 0\n", "train.steps: must be >= 1"),
    (_BASE + "[optim]\nvision_lr_ratio = 0\n", "optim.vision_lr_ratio: must be > 0"),
    ("[model]\n[data]\ntrain = ['x.txt']\n", "pretrain needs exactly one of model.preset, model.config"),
    ("job = 'sft'\n[data]\ntrain = ['x.txt']\n", "model.checkpoint: sft starts from a checkpoint"),
    (_BASE + "[lora]\ntargets = ['attention', 'mlp']\n", "lora.targets: unknown or empty: \\['mlp'\\]"),
    (_BASE + "[distributed]\ntensor_parallel = 0\n", "distributed.tensor_parallel: must be >= 1"),
    (_BASE + "[distributed]\ntensor_parallel = 2\n", "distributed.tensor_parallel: cannot be combined with expert_parallel"),
    ("job = 'lora'\n[model]\ncheckpoint = 'm'\n[data]\ntrain = ['x.txt']\n[distributed]\ntensor_parallel = 2\n"
     "expert_parallel = false\n", "distributed.tensor_parallel: lora adapters are not tensor-parallel"),
    ("[train\n", "not valid TOML"),
    ("[model]\npreset = 'tiny-moe'\nquantize = 'int4'\n[data]\ntrain = ['x.txt']\n",
     "model.quantize: a quantized base is frozen, but pretrain trains every weight"),
    (_QLORA.replace("lora", "sft"), "model.quantize: a quantized base is frozen, but sft trains every weight"),
    (_QLORA.replace("int4", "int3"), "model.quantize: must be int8, int4"),
    (_QLORA + "quantize_group = 100\n", "model.quantize_group: must be one of 32, 64, 128, 256"),
    (_QLORA + "quantize_modules = ['router']\n", "model.quantize_modules: unknown or empty: \\['router'\\]"),
    ("device = 'cuda'\n" + _QLORA, "model.quantize: quantized weights run on the CPU so far"),
])
def test_config_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(TrainConfigError, match=message):
        load_config(path)


def test_quantized_base_is_refused_on_several_processes_before_loading(tmp_path, monkeypatch):
    """FSDP and expert parallelism shard parameters; a quantized base is buffers: one process only, said
    before the checkpoint is read (here it does not even exist)."""
    from herd.train import trainer as trainer_module
    from herd.train.parallel import World

    path = tmp_path / "c.toml"
    path.write_text(_QLORA)
    monkeypatch.setattr(trainer_module, "init_world", lambda *args: World(rank=0, size=2))
    with pytest.raises(TrainConfigError, match="model.quantize: a quantized base trains in one process so far"):
        Trainer(load_config(path))


def test_overrides_and_field_docs(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\npreset = 'tiny-moe'\n[data]\ntrain = ['x.txt']\n")
    cfg = load_config(path, ["optim.lr=1e-3", "train.dtype=bfloat16", "data.train=['a.txt', 'b.txt']"])
    assert cfg.optim.lr == 1e-3 and cfg.train.dtype == "bfloat16" and cfg.data.train[1] == str(tmp_path / "b.txt")
    with pytest.raises(TrainConfigError, match="optim.nope: unknown key"):
        load_config(path, ["optim.nope=1"])
    docs = describe_fields()
    assert "optim.lr = 0.0003  # peak learning rate" in docs and "[distributed]" in docs


def test_checkpoint_is_a_folder_beside_the_recipe_or_a_model_name(tmp_path):
    """model.checkpoint is read relative to the recipe even before an earlier stage writes it (so a
    missing one is named where the recipe meant it), and stays a name when it is one herd.load knows."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    path = recipes / "c.toml"
    for value, want in (("../runs/final", str(recipes / "../runs/final")), ("tiny-moe", "tiny-moe"),
                        ("herd-tiny", "herd-tiny"), ("later", str(recipes / "later"))):
        path.write_text(f"job = 'sft'\n[model]\ncheckpoint = '{value}'\n[data]\ntrain = ['x.jsonl']\n")
        assert load_config(path).model.checkpoint == want
    from herd.checkpoint.errors import CheckpointError
    from herd.train.trainer import build

    with pytest.raises(CheckpointError, match=f"model.checkpoint: {recipes / 'later'}: not a directory"):
        build(load_config(path))
    (recipes / "tiny-moe").mkdir()  # a folder of that name beside the recipe wins, as in herd.load
    path.write_text("job = 'sft'\n[model]\ncheckpoint = 'tiny-moe'\n[data]\ntrain = ['x.jsonl']\n")
    assert load_config(path).model.checkpoint == str(recipes / "tiny-moe")


def test_bad_training_data_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    path = tmp_path / "c.toml"
    base = tmp_path / "base"
    herd.load("tiny-dense").save_pretrained(base)
    path.write_text(f"job = 'sft'\nout_dir = 'o'\n[model]\ncheckpoint = '{base}'\n[data]\ntrain = ['bad.jsonl']\n"
                    "[train]\nprogress = false\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no assistant message"):
        Trainer(load_config(path))
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                        '{"role": "assistant", "content": "yo"}]}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        Trainer(load_config(path))
    path.write_text(path.read_text().replace("bad.jsonl", "missing*.jsonl"))
    with pytest.raises(DataError, match="data.train: .*missing\\*.jsonl matches no file"):
        Trainer(load_config(path))


@pytest.mark.slow
def test_sft_with_images_bf16_and_activation_checkpointing(tmp_path):
    """Chat rows with images train the vision encoder too (early fusion); bf16 autocast and activation
    checkpointing give the step the float32 run gives, to bf16 precision."""
    from PIL import Image
    Image.new("RGB", (80, 60), (230, 25, 25)).save(tmp_path / "red.png")
    Image.new("RGB", (60, 80), (25, 25, 230)).save(tmp_path / "blue.png")
    with open(tmp_path / "img.jsonl", "w") as f:
        for name, colour in (("red.png", "Red."), ("blue.png", "Blue.")) * 4:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image", "image": name},
                                             {"type": "text", "text": "What colour is this?"}]},
                {"role": "assistant", "content": colour}]}) + "\n")
    base = tmp_path / "base"
    herd.load("tiny-moe").save_pretrained(base)
    (tmp_path / "c.toml").write_text(textwrap.dedent(f"""
        job = "sft"
        [model]
        checkpoint = "{base}"
        [data]
        train = ["img.jsonl"]
        val_fraction = 0
        seq_len = 128
        [train]
        steps = 2
        micro_batch = 4
        eval_every = 0
        save_every = 0
        progress = false
    """))
    losses = {}
    for name, extra in (("f32", []), ("bf16", ["train.dtype=bfloat16", "train.activation_checkpointing=true"])):
        trainer = Trainer(load_config(tmp_path / "c.toml", [f"out_dir={tmp_path / name}"] + extra))
        before = trainer.vision.projector.weight.detach().clone()
        first = trainer.train_step()
        assert first["tokens"] > 4 * 2 * 4  # rows hold the images' patch tokens
        assert not torch.equal(before, trainer.vision.projector.weight)  # the encoder learned
        losses[name] = first["loss"]
    assert abs(losses["bf16"] - losses["f32"]) <= 0.02 * losses["f32"], losses
    # The encoder is part of the checkpoint: a resumed run continues with the trained encoder.
    cfg = load_config(tmp_path / "c.toml", [f"out_dir={tmp_path / 'resume'}", "train.save_every=1"])
    trainer = Trainer(cfg)
    trainer.run(stop_after=1)
    trained = {k: v.detach().clone() for k, v in trainer.vision.state_dict().items()}
    resumed = Trainer(cfg)
    assert resumed.step == 1
    assert all(torch.equal(trained[k], v) for k, v in resumed.vision.state_dict().items())
    # optim.vision_lr_ratio: the encoder's groups run at that share of the text model's rate, all along.
    slow = Trainer(load_config(tmp_path / "c.toml", [f"out_dir={tmp_path / 'slow'}", "optim.vision_lr_ratio=0.1"]))
    vision_ids = {id(p) for p in slow.vision.parameters()}
    for _ in range(2):
        rates = {any(id(p) in vision_ids for p in g["params"]): g["lr"] for g in slow.opt.param_groups}
        assert rates[True] == pytest.approx(0.1 * rates[False]) and rates[False] > 0
        slow.train_step()


def test_one_document_file_larger_than_a_read_block(tmp_path):
    """data.doc_separator = '': a file is one document even when read in several blocks."""
    from herd.train import data
    text = corpus(60, seed=2).replace("\n\n", " ")
    (tmp_path / "one.txt").write_text(text)
    tok = herd.load("tiny-dense").tokenizer
    old, data._READ_BYTES = data._READ_BYTES, 1000  # force many blocks
    try:
        docs = data.tokenise([tmp_path / "one.txt"], tmp_path / "cache", data.Encoder(tok), "", False)
    finally:
        data._READ_BYTES = old
    assert len(docs) == 1
    ids = [int(i) for i in docs.tokens]
    assert ids[0] == tok.bos_id and ids[-1] == tok.token_id("<|end_of_text|>")
    assert tok.decode(ids[1:-1]) == text


def test_fine_tuning_the_default_model_by_name_exports_what_transformers_needs(tmp_path):
    """sft from "herd-tiny" (a name, not a path): final/ once lacked tokenizer_config.json and
    preprocessor_config.json, so AutoTokenizer had no BOS, EOS or chat template."""
    from transformers import AutoTokenizer

    with open(tmp_path / "chat.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": "Say hi."},
                                             {"role": "assistant", "content": "Hi."}]}) + "\n")
    (tmp_path / "c.toml").write_text(textwrap.dedent(f"""
        job = "sft"
        out_dir = "{tmp_path / 'run'}"
        [model]
        checkpoint = "herd-tiny"
        [data]
        train = ["chat.jsonl"]
        val_fraction = 0
        seq_len = 64
        [train]
        steps = 1
        micro_batch = 2
        eval_every = 0
        save_every = 0
        progress = false
    """))
    final = Trainer(load_config(tmp_path / "c.toml")).run()
    assert (final / "tokenizer_config.json").is_file() and (final / "preprocessor_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot|>" and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    llm = herd.load(final, progress=False)
    assert list(ids) == llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]).ids
