"""`herd train` configuration: one TOML file, every field documented here, overridable from the
command line (``--set optim.lr=1e-3``).

The field tables below are the manual: ``herd train --fields`` prints them, and unknown or
mistyped keys are errors that name the key (a typo must not silently train with a default).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A training config key is unknown, mistyped or out of range."""


def doc(text: str, default: Any = dataclasses.MISSING, **kw):
    """A dataclass field with its documentation (printed by `herd train --fields`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass
class ModelSection:
    preset: str = doc("pretrain: a preset name (tiny-moe, tiny-interleaved, ...) giving the architecture", "")
    config: str = doc("pretrain: a Hugging Face config.json giving the architecture (instead of preset)", "")
    checkpoint: str = doc("sft / lora: the checkpoint folder (HF or Meta; relative to the recipe) or model name "
                          "(herd.load's) to start from", "")
    tokenizer: str = doc("tokenizer file (tokenizer.json or tokenizer.model); default: the checkpoint's, "
                         "else the config's folder's, else Llama 4's bundled one", "")
    init_std: float = doc("pretrain: weights start as N(0, init_std); norms at 1 (herd's documented scheme)", 0.02)
    scale_output_init: bool = doc("pretrain: the projections writing into the residual stream (wo, w2) start "
                                  "scaled by 1/sqrt(2 * n_layers) as in GPT-2; false: at init_std like the rest "
                                  "(in-context lookups formed sooner so in herd-tiny's probes)", True)
    vision: bool = doc("build / keep the vision encoder when the architecture has one", True)
    quantize: str = doc("lora: the base model quantized as it loads, int8 (per output channel) or int4 (groups), "
                        "and frozen: QLoRA (adapters in float32; one process on the CPU so far); '' = off", "")
    quantize_group: int = doc("int4: inputs per scale and zero: 32, 64, 128 or 256", 128)
    quantize_modules: list = doc("what model.quantize quantizes: some of experts (every routed expert), "
                                 "shared_expert, dense_ffn, attention, output", ["experts", "shared_expert"])
    text_init: str = doc("pretrain: the decoder's starting weights (a .safetensors file with herd's TextModel "
                         "names, e.g. from `python -m experiments.herd_tiny probe --save`); default: random init", "")
    vision_init: str = doc("pretrain: the vision encoder's starting weights (a .safetensors file with herd's "
                           "VisionModel names, e.g. from `python -m experiments.herd_tiny encoder`); default: random init", "")


@dataclass
class DataSection:
    train: list = doc("files or glob patterns: .txt (raw text), .jsonl (per line {'text': ...}: raw text, every "
                      "token learned, or {'messages': [...]}: a chat, only assistant tokens learned; any job "
                      "takes both)", [])
    val: list = doc("held-out files; empty: take val_fraction of the training documents", [])
    val_fraction: float = doc("share of documents held out when no val files are given (chosen by seed)", 0.05)
    seq_len: int = doc("tokens per packed training row", 512)
    shuffle: bool = doc("shuffle the training documents each epoch (seeded); false keeps file order, "
                        "for a curriculum written in order", True)
    doc_separator: str = doc("in .txt files, the string between documents ('' = one document per file)", "\n\n")
    text_field: str = doc("the JSON field holding a document's text in pretrain .jsonl files", "text")
    cache_dir: str = doc("where tokenised data is kept (default: OUT_DIR/data); reused when the sources "
                         "and tokenizer are unchanged", "")


@dataclass
class OptimSection:
    lr: float = doc("peak learning rate (AdamW)", 3e-4)
    min_lr_ratio: float = doc("the cosine schedule ends at lr * min_lr_ratio", 0.1)
    warmup_steps: int = doc("linear warm-up steps from 0 to lr", 20)
    weight_decay: float = doc("AdamW decoupled weight decay on matrices (not on norms or biases)", 0.1)
    beta1: float = doc("AdamW beta1", 0.9)
    beta2: float = doc("AdamW beta2", 0.95)
    eps: float = doc("AdamW epsilon", 1e-8)
    grad_clip: float = doc("clip the global gradient norm to this (0 = off)", 1.0)
    vision_lr_ratio: float = doc("the vision encoder's learning rate is lr * vision_lr_ratio (same schedule); "
                                 "below 1 keeps a from-scratch encoder from drifting faster than the text "
                                 "model learns to read it", 1.0)


@dataclass
class TrainSection:
    steps: int = doc("optimizer steps", 200)
    micro_batch: int = doc("packed rows per forward pass (per process)", 4)
    grad_accum: int = doc("forward/backward passes per optimizer step", 1)
    dtype: str = doc("float32, or bfloat16 (autocast: float32 master weights, bf16 matmuls)", "float32")
    activation_checkpointing: bool = doc("recompute each decoder block in the backward pass (less memory)", False)
    eval_every: int = doc("held-out loss / perplexity every N steps (0 = only at the end)", 50)
    eval_rows: int = doc("held-out rows per evaluation (0 = all)", 64)
    save_every: int = doc("checkpoint every N steps (0 = only at the end)", 100)
    keep_checkpoints: int = doc("how many recent checkpoints to keep", 2)
    log_every: int = doc("write a metrics line every N steps", 1)
    progress: bool = doc("show a progress bar with tokens/s and ETA", True)
    threads: int = doc("torch CPU threads (0 = torch's default)", 0)


@dataclass
class MoESection:
    aux_loss: float = doc("coefficient of the Switch-Transformer load-balancing loss E * sum_e f_e * P_e "
                          "(f_e: share of routed tokens, P_e: mean softmax router probability), per layer, "
                          "averaged over MoE layers; herd uses this auxiliary loss, not bias-based balancing", 0.01)
    z_loss: float = doc("coefficient of the router z-loss mean(logsumexp(router logits)^2) (0 = off)", 0.0)


@dataclass
class LoRASection:
    rank: int = doc("adapter rank r", 8)
    alpha: float = doc("scale alpha / r of the adapter's output", 16.0)
    targets: list = doc("where adapters go: attention (wq, wk, wv, wo), shared_expert, experts (every routed "
                        "expert), dense_ffn, output (the head: needed when the data uses tokens the base model "
                        "never learned to emit, e.g. chat tokens on a base model)",
                        ["attention", "shared_expert", "experts"])
    merge: bool = doc("export the merged model (weights + adapters) besides the adapters alone", True)


@dataclass
class DistributedSection:
    expert_parallel: bool = doc("with several processes: split the routed experts over them and exchange "
                                "tokens with all-to-all (otherwise experts are FSDP-sharded like the rest)", True)
    tensor_parallel: int = doc("processes per tensor-parallel group (DTensor): attention heads, FFN widths and "
                               "every routed expert's width are split over them; the groups are data-parallel "
                               "(FSDP). 1: off. Needs expert_parallel = false", 1)
    backend: str = doc("torch.distributed backend: gloo (CPU) or nccl (CUDA); '' picks by device", "")


@dataclass
class TrainConfig:
    job: str = doc("pretrain, sft or lora", "pretrain")
    out_dir: str = doc("run folder: checkpoints/, metrics.jsonl, loss.png, final/ (the exported model)", "runs/train")
    seed: int = doc("seed for initialisation, data order and the held-out split", 0)
    device: str = doc("cpu or cuda", "cpu")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    moe: MoESection = field(default_factory=MoESection)
    lora: LoRASection = field(default_factory=LoRASection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def check(self) -> TrainConfig:
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise TrainConfigError(f"{key}: {what}")
        need(self.job in ("pretrain", "sft", "lora"), "job", f"must be pretrain, sft or lora, got {self.job!r}")
        m = self.model
        if self.job == "pretrain":
            need(bool(m.preset) != bool(m.config), "model", "pretrain needs exactly one of model.preset, model.config")
        else:
            need(bool(m.checkpoint), "model.checkpoint", f"{self.job} starts from a checkpoint; none given")
            need(not m.vision_init, "model.vision_init", f"only for pretrain; {self.job} takes the checkpoint's encoder")
            need(not m.text_init, "model.text_init", f"only for pretrain; {self.job} takes the checkpoint's decoder")
        if m.quantize:
            from herd.kernels import quant
            need(m.quantize in quant.MODES, "model.quantize", f"must be int8, int4 or '', got {m.quantize!r}")
            need(self.job == "lora", "model.quantize", f"a quantized base is frozen, but {self.job} trains every "
                 "weight: use job = 'lora' (QLoRA), or drop model.quantize")
            need(self.device == "cpu", "model.quantize", f"quantized weights run on the CPU so far; device "
                 f"{self.device!r} needs an unquantized base")
            need(m.quantize_group in quant.GROUPS, "model.quantize_group",
                 f"must be one of {', '.join(map(str, quant.GROUPS))}, got {m.quantize_group}")
            bad = set(m.quantize_modules) - set(quant.MODULES)
            need(not bad and bool(m.quantize_modules), "model.quantize_modules", f"unknown or empty: {sorted(bad)} "
                 f"(known: {', '.join(quant.MODULES)})")
        need(bool(self.data.train), "data.train", "no training files given")
        need(self.data.seq_len >= 8, "data.seq_len", f"must be >= 8, got {self.data.seq_len}")
        need(0 <= self.data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {self.data.val_fraction}")
        o, t = self.optim, self.train
        need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        need(o.vision_lr_ratio > 0, "optim.vision_lr_ratio", f"must be > 0, got {o.vision_lr_ratio}")
        need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
        need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
        need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
        need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        need(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
        need(t.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {t.micro_batch}")
        need(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
        need(t.dtype in ("float32", "bfloat16"), "train.dtype", f"must be float32 or bfloat16, got {t.dtype!r}")
        for key in ("eval_every", "eval_rows", "save_every", "threads"):
            need(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
        need(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
        need(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
        need(self.moe.aux_loss >= 0 and self.moe.z_loss >= 0, "moe", "loss coefficients must be >= 0")
        d = self.distributed
        need(d.tensor_parallel >= 1, "distributed.tensor_parallel", f"must be >= 1, got {d.tensor_parallel}")
        need(d.tensor_parallel == 1 or not d.expert_parallel, "distributed.tensor_parallel",
             "cannot be combined with expert_parallel (it splits every expert's width instead): "
             "set distributed.expert_parallel = false")
        need(d.tensor_parallel == 1 or self.job != "lora", "distributed.tensor_parallel",
             "lora adapters are not tensor-parallel: train them with tensor_parallel = 1")
        need(self.lora.rank >= 1, "lora.rank", f"must be >= 1, got {self.lora.rank}")
        bad = set(self.lora.targets) - {"attention", "shared_expert", "experts", "dense_ffn", "output"}
        need(not bad and bool(self.lora.targets), "lora.targets", f"unknown or empty: {sorted(bad)}")
        need(self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), "device",
             f"must be cpu or cuda, got {self.device!r}")
        return self


def _check_type(key: str, value: Any, kind: Any) -> Any:
    # Field types are strings here (postponed annotations): map them to the classes.
    kind = {"str": str, "int": int, "float": float, "bool": bool, "list": list}.get(kind, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, str):
        return [value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TrainConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fill(obj: Any, values: dict, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise TrainConfigError(f"{name}: unknown key (known: {', '.join(sorted(fields))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TrainConfigError(f"{name}: expected a [{name}] table, got {type(value).__name__}")
            _fill(current, value, name + ".")
        else:
            setattr(obj, key, _check_type(name, value, fields[key].type))


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, eq, raw = item.partition("=")
    if not eq or not key:
        raise TrainConfigError(f"override {item!r}: expected section.key=value")
    try:  # a TOML value (numbers, booleans, quoted strings, lists); otherwise a bare string
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file (paths in it are relative to the file) and key=value overrides."""
    values: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except OSError as e:
            raise TrainConfigError(f"{path}: cannot read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{path}: not valid TOML ({e})") from None
        base = path.resolve().parent
    for item in overrides:
        keys, value = _parse_override(item)
        d = values
        for k in keys[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise TrainConfigError(f"override {item!r}: {k} is not a table")
        d[keys[-1]] = value
    cfg = TrainConfig()
    _fill(cfg, values, "")
    _resolve_paths(cfg, base)
    return cfg.check()


def _resolve_paths(cfg: TrainConfig, base: Path) -> None:
    def fix(p: str) -> str:
        return str(base / p) if p and not Path(p).is_absolute() and not p.startswith("~") else p
    cfg.out_dir = fix(cfg.out_dir)
    cfg.model.config, cfg.model.tokenizer, cfg.data.cache_dir = (fix(cfg.model.config), fix(cfg.model.tokenizer),
                                                                 fix(cfg.data.cache_dir))
    cfg.model.vision_init, cfg.model.text_init = fix(cfg.model.vision_init), fix(cfg.model.text_init)
    # A folder relative to the recipe (as every path here), whether it exists yet or not (an earlier
    # stage may write it), unless it is a name herd.load knows and no such folder is there.
    from herd.config import PRESETS
    from herd.bundled import MODELS

    ckpt = cfg.model.checkpoint
    if ckpt and ((base / ckpt).exists() or ckpt not in (*PRESETS, *MODELS)):
        cfg.model.checkpoint = fix(ckpt)
    cfg.data.train = [fix(p) for p in cfg.data.train]
    cfg.data.val = [fix(p) for p in cfg.data.val]


def describe_fields() -> str:
    """The documentation of every field, as `herd train --fields` prints it."""
    lines = []

    def walk(obj: Any, prefix: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"\n[{prefix}{f.name}]")
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name} = {value!r}  # {f.metadata['doc']}")
    walk(TrainConfig(), "")
    return "\n".join(lines)


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

