"""`herd.load` and the `LLM` handle users hold: config + tokenizer + model on one device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.load import load_text_model, read_config, save_hf
from herd.config import PRESETS, ModelConfig, preset
from herd.model.transformer import TextModel
from herd.tokenizer.tokenizer import Tokenizer, TokenizerError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name ('float32', 'bfloat16', 'float16') or a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")


@torch.no_grad()
def init_weights(model: TextModel, seed: int = 0, std: float = 0.02) -> TextModel:
    """Random init for presets: N(0, std) for every matrix, ones for norms (herd's documented scheme)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return model


class LLM:
    """A loaded Llama 4 model: ``llm.config``, ``llm.tokenizer``, ``llm.logits(ids)``."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: TextModel, source: str):
        self.config, self.tokenizer, self.model, self.source = config, tokenizer, model, source

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.output.weight.dtype

    def __repr__(self) -> str:
        t = self.config.text
        return (f"LLM({self.source!r}, {self.config.param_count() / 1e9:.3g}B params, "
                f"{t.n_layers} layers, {self.dtype}, {self.device})")

    def _as_batch(self, input_ids) -> torch.Tensor:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(ids.shape)}")
        V = self.config.text.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"input_ids must be in [0, {V}); got range [{int(ids.min())}, {int(ids.max())}]")
        return ids.to(device=self.device, dtype=torch.long)

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Token ids [B, T] (or [T], or lists) -> float32 logits [B, T, vocab]; full forward, no cache."""
        return self.model(self._as_batch(input_ids))

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Write a Hugging Face checkpoint folder that herd.load and transformers both read."""
        extra = {}
        if self.tokenizer.path is not None:
            extra[self.tokenizer.path.name] = self.tokenizer.path
        return save_hf(self.model, folder, dtype=None if dtype is None else resolve_dtype(dtype), extra_files=extra)


def load(path_or_preset: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu",
         *, seed: int = 0, progress: bool = True) -> LLM:
    """Load a Hugging Face folder, a Meta folder, or a preset name (random weights) as an LLM.

    Raises CheckpointError (a ValueError) naming the file, tensor or field at fault; nothing is
    returned half-loaded.
    """
    dt = resolve_dtype(dtype)
    name = os.fspath(path_or_preset)
    if name in PRESETS and not Path(name).exists():
        cfg = preset(name)
        tok = Tokenizer.bundled()
        _check_vocab(tok, cfg, f"preset '{name}'")
        if torch.device(device).type == "meta":
            with torch.device("meta"):
                return LLM(cfg, tok, TextModel(cfg.text).to(dt), name)
        _check_fits(cfg, dt, name)
        model = init_weights(TextModel(cfg.text), seed=seed).to(device=device, dtype=dt)
        return LLM(cfg, tok, model.eval().requires_grad_(False), name)
    cfg, fmt = read_config(name)
    try:
        tok = Tokenizer.from_folder(name, cfg.text.vocab_size)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    _check_vocab(tok, cfg, name)
    model = load_text_model(name, cfg, fmt, dtype=dt, device=device, progress=progress)
    return LLM(cfg, tok, model, name)


def _check_vocab(tok: Tokenizer, cfg: ModelConfig, where: str) -> None:
    if tok.vocab_size != cfg.text.vocab_size:
        raise CheckpointError(f"{where}: tokenizer '{tok.path or 'bundled'}' has {tok.vocab_size} ids but the "
                              f"config's vocab_size is {cfg.text.vocab_size}")


def _check_fits(cfg: ModelConfig, dtype: torch.dtype, name: str) -> None:
    need = cfg.text.param_count() * torch.empty((), dtype=dtype).element_size()
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if need > have:
        raise ValueError(f"preset '{name}' needs {need / 2**30:.0f} GiB for random weights but this machine has "
                         f"{have / 2**30:.0f} GiB; use device='meta' to plan without memory")
