"""herd.load / save_pretrained: round trips, dtypes, presets, and every kind of bad checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd import CheckpointError
from tests.conftest import assert_logits_close, tiny_text

IDS = torch.randint(0, 202_048, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ckpt(write_hf):
    folder, ref = write_hf(tiny_text("tiny-interleaved"), seed=11)
    return folder, ref


def test_save_pretrained_round_trip_through_transformers(ckpt, tmp_path):
    from transformers import Llama4ForCausalLM

    folder, _ = ckpt
    llm = herd.load(folder, progress=False)
    out = llm.save_pretrained(tmp_path / "exported")
    back = Llama4ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert_logits_close(llm.logits(IDS), back(IDS).logits, rel=1e-5)
    again = herd.load(out, progress=False)
    assert again.config.text == llm.config.text
    for (k, a), (_, b) in zip(llm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_loading_progress_counts_each_file_byte_once(ckpt, capsys, monkeypatch):
    """HF's fused expert tensors (gate_up_proj) feed two weights each; the progress bar counts their
    bytes once and ends at exactly the checkpoint's size: 100%."""
    from herd.checkpoint import load as load_mod

    bars = []
    init = load_mod._Progress.__init__
    monkeypatch.setattr(load_mod._Progress, "__init__", lambda self, *a: (init(self, *a), bars.append(self))[0])
    folder, _ = ckpt
    herd.load(folder)
    files = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
    assert len(bars) == 1 and bars[0].done == bars[0].total == files
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("loading ")]
    assert lines[-1].startswith(f"loading {folder.name}: 100%"), lines


def test_load_in_bfloat16_converts_on_the_way(ckpt):
    folder, ref = ckpt
    llm = herd.load(folder, dtype="bfloat16", progress=False)
    full = herd.load(folder, progress=False)
    # Every weight is the float32 weight rounded to bfloat16 (converted tensor by tensor while streaming).
    for (k, a), (_, b) in zip(llm.model.state_dict().items(), full.model.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), k
    logits = llm.logits(IDS)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # bf16 rounding (and the odd routing flip it causes) moves logits a little, not a parity claim:
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), full.logits(IDS).flatten(), dim=0)
    assert cos > 0.97, cos


def test_presets():
    llm = herd.load("tiny-moe")
    assert llm.logits(IDS).shape == (2, 24, 202_048)
    scout = herd.load("scout", device="meta")
    assert scout.model.output.weight.is_meta
    with pytest.raises(ValueError, match="unknown preset|not a directory"):
        herd.load("sprout")


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one clear error naming the file and the tensor or field.


def _rewrite_tensor(folder: Path, key: str, fn):
    f = folder / "model.safetensors"
    sd = load_file(f)
    sd[key] = fn(sd[key])
    save_file(sd, f, metadata={"format": "pt"})


def _edit_config(folder: Path, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


EMBED = "model.embed_tokens.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        herd.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        herd.load(tmp_path / "nowhere")


def test_missing_weights_file(ckpt):
    folder, _ = ckpt
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        herd.load(folder)


def test_missing_shard(write_hf):
    folder, _ = write_hf(tiny_text("tiny-moe"), shard="20MB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        herd.load(folder)


def test_missing_tensor(ckpt):
    folder, _ = ckpt
    sd = load_file(folder / "model.safetensors")
    del sd[Q1]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"model.safetensors: missing tensor '{Q1}'"):
        herd.load(folder)


def test_unexpected_tensor(ckpt):
    folder, _ = ckpt
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.self_attn.q_norm.weight'"):
        herd.load(folder)


def test_wrong_shape(ckpt):
    folder, _ = ckpt
    _rewrite_tensor(folder, Q1, lambda t: t[:-1])
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{Q1}' gives shape \(63, 64\)"):
        herd.load(folder)


def test_wrong_dtype(ckpt):
    folder, _ = ckpt
    _rewrite_tensor(folder, Q1, lambda t: t.to(torch.int32))
    with pytest.raises(CheckpointError, match=f"'{Q1}' has dtype torch.int32"):
        herd.load(folder)


def test_corrupt_safetensors(ckpt):
    folder, _ = ckpt
    (folder / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        herd.load(folder)


def test_truncated_safetensors(ckpt):
    folder, _ = ckpt
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' ends at byte \d+ but the file has"):
        herd.load(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_hiden_layers=3), r"unknown field\(s\) \['num_hiden_layers'\]"),
    (lambda c: c.update(num_key_value_heads=3), r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    (lambda c: c.update(model_type="llama"), "model_type 'llama' is not a Llama 4 model"),
    (lambda c: c.update(layer_types=["full_attention"] * 4), "layer_types contradicts no_rope_layers"),
    (lambda c: c.update(moe_layers=[1, 9]), "moe_layers .* outside"),
    (lambda c: c.update(num_experts_per_tok=9), "top_k must be in"),
    (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope type 'yarn'"),
    (lambda c: c.update(num_hidden_layers=5), "missing tensor 'model.layers.4|no_rope_layers has 4 entries"),
])
def test_bad_config(ckpt, edit, message):
    folder, _ = ckpt
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        herd.load(folder)
    assert "config.json" in str(e.value) or "model.safetensors" in str(e.value)


def test_broken_config_json(ckpt):
    folder, _ = ckpt
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read JSON"):
        herd.load(folder)


def test_tokenizer_vocab_disagrees_with_config(ckpt, tmp_path):
    folder, _ = ckpt
    # Same weights but a config claiming a smaller vocabulary: the bundled tokenizer cannot serve it.
    _edit_config(folder, lambda c: c.update(vocab_size=1000))
    with pytest.raises(CheckpointError, match="1000|vocab"):
        herd.load(folder)


def test_tokenizer_model_file_is_used_and_checked(ckpt):
    from herd.tokenizer.tokenizer import Tokenizer

    folder, _ = ckpt
    shutil.copy(Tokenizer.bundled().path, folder / "tokenizer.model")
    llm = herd.load(folder, progress=False)
    assert llm.tokenizer.path == folder / "tokenizer.model"
    (folder / "tokenizer.model").write_text("this is not a tiktoken file\n")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        herd.load(folder)


@pytest.mark.slow
def test_cli_info_and_generate_say_random(tmp_path):
    out = subprocess.run([sys.executable, "-m", "herd", "info", "scout"], capture_output=True, text=True)
    assert out.returncode == 0 and "active per token" in out.stdout
    gen = subprocess.run([sys.executable, "-m", "herd", "generate", "Hi", "--max-new-tokens", "3"],
                         capture_output=True, text=True)  # the default: herd-tiny, trained
    assert gen.returncode == 0 and "RANDOM" not in gen.stderr, gen.stderr
    gen = subprocess.run([sys.executable, "-m", "herd", "generate", "Hi", "--max-new-tokens", "3", "--model",
                          "tiny-moe"], capture_output=True, text=True)
    assert gen.returncode == 0 and "RANDOM weights" in gen.stderr, gen.stderr
    bad = subprocess.run([sys.executable, "-m", "herd", "generate", "Hi", "--model", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a checkpoint folder" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_loading_peak_memory_stays_within_1_2x(tmp_path):
    """Streamed loading: peak RSS growth <= 1.2x the loaded parameters (a 0.3 GB checkpoint here;
    benchmarks/load_memory.py measures >= 1 GB)."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"
    out = subprocess.run([sys.executable, str(bench), "--gb", "0.3", "--formats", "hf", "meta",
                          "--dtypes", "bfloat16", "float32", "--json"],
                         capture_output=True, text=True, env={**os.environ, "HERD_BENCH_TMP": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert r["ratio"] <= 1.2, r


@pytest.mark.slow
def test_loading_quantized_peaks_near_the_quantized_size(tmp_path):
    """quantize="int4" quantizes each tensor as it streams in: peak growth <= 1.3x the quantized model."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"
    out = subprocess.run([sys.executable, str(bench), "--gb", "0.3", "--formats", "hf", "meta", "--dtypes", "bfloat16",
                          "--quantize", "int4", "--json"],
                         capture_output=True, text=True, env={**os.environ, "HERD_BENCH_TMP": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and all(r["ratio"] <= 1.3 for r in rows), rows


@pytest.mark.parametrize("device, words", [("cuda", "CPU-only build"), ("cuda:0", "CPU-only build"),
                                           ("mps", "no Apple GPU"), ("tpu", "not a device torch knows")])
def test_a_device_this_torch_lacks_is_one_clear_line(device, words, capsys):
    """--device cuda on a CPU-only torch once ended in torch's AssertionError deep in a copy."""
    if torch.version.cuda is not None and device.startswith("cuda"):
        pytest.skip("this torch has CUDA")
    with pytest.raises(ValueError, match=words):
        herd.load("tiny-dense", device=device)
    from herd.cli import main

    assert main(["generate", "hi", "--model", "tiny-dense", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("herd: error: device") and words in err[-1] and "Traceback" not in "".join(err)


def test_served_name_of_a_folder_given_as_dot(tmp_path, monkeypatch):
    from herd.cli import served_name

    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert served_name(".", None) == "my-model" and served_name("./", None) == "my-model"
    assert served_name(str(folder) + "/", None) == "my-model" and served_name(".", "chosen") == "chosen"
    assert served_name("tiny-moe", None) == "tiny-moe"


def test_info_on_the_default_model_in_readable_units(capsys):
    """`herd info herd-tiny` once failed (not a directory), small models read '0.00B active', and the
    vision encoder went unmentioned."""
    from herd.cli import _count, main

    assert main(["info", "herd-tiny"]) == 0
    out = capsys.readouterr().out
    assert "M total" in out and "M active per token" in out and "0.00B" not in out
    assert "vision: 3 layers" in out and "K vision" in out
    assert main(["info", "tiny-dense"]) == 0 and "vision: none" in capsys.readouterr().out
    assert [_count(n) for n in (108_641_000_000, 17_170_000_000, 5_120_000, 965_800, 37_900, 12)] == \
        ["108.6B", "17.2B", "5.12M", "965.8K", "37.9K", "12"]


def test_checks_that_need_no_model_come_before_loading(tmp_path, monkeypatch, capsys):
    """`herd convert MODEL out` into a non-empty `out`, `herd generate --image missing.png`: refused
    before the model loads (they once loaded to 100% first)."""
    from herd.cli import build_parser, main

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before checking")

    monkeypatch.setattr(herd, "load", no_load)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", "tiny-dense", str(tmp_path / "out")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["generate", "hi", "--image", str(tmp_path / "missing.png")]) == 2
    assert "file not found" in capsys.readouterr().err
    convert = next(a for a in build_parser()._subparsers._group_actions[0].choices["convert"]._actions
                   if a.dest == "dtype")
    assert "bfloat16" in convert.help and "source" in convert.help


def test_serve_checks_its_options_before_loading(tmp_path, monkeypatch, capsys):
    """Siblings of convert's late check: a port already taken, a missing image folder."""
    import socket

    from herd.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before checking")

    monkeypatch.setattr(herd, "load", no_load)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--allow-images-from", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_experts_that_disagree_with_the_config_are_counted_in_the_error(tmp_path):
    llm = herd.load("tiny-moe", progress=False)
    folder = llm.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["num_local_experts"] == 4
    text["num_local_experts"] = 6
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*router.weight.*\(config: 6 experts; "
                                              r"the file's router has 4 rows\)"):
        herd.load(folder)
