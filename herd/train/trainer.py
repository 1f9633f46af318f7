"""`herd train`: pretraining, chat fine-tuning (SFT) and LoRA with the model code that serves.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` packed rows on each of the
W processes. Every rank knows which rows the whole step covers (they are a function of the step),
so each divides its summed token losses by the step's global target count: the summed gradients
are those of the global mean loss, whatever W and grad_accum are (one process with grad_accum 2
takes the same steps as two processes with grad_accum 1).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from herd.checkpoint.errors import CheckpointError, check_tensors
from herd.checkpoint.folder import carried_files, folder_max_tiles
from herd.config import from_hf_config, preset
from herd.kernels.quant import plain_state
from herd.model.init import init_weights
from herd.model.lora import add_adapters, merge
from herd.model.moe import MoE
from herd.model.transformer import TextModel
from herd.model.vision import VisionModel
from herd.train import resume as ckpt
from herd.train.config import TrainConfig, TrainConfigError, as_dict
from herd.train.loss import summed_loss
from herd.train.data import Batch, DataError, Documents, Encoder, PackedData, expand_sources, split_documents, tokenise
from herd.train.metrics import Metrics
from herd.tokenizer.chat_format import ChatTokenizer
from herd.tokenizer.tokenizer import Tokenizer
from herd.images import DEFAULT_MAX_TILES, ImageTiler
from herd.train.parallel import World, apply_fsdp, apply_tensor_parallel, gather_state, init_world, shard_experts


@dataclass
class Built:
    model: TextModel
    vision: VisionModel | None
    tokenizer: object
    tiler: object | None
    base: str  # where the weights came from
    extra_files: dict  # name -> path: copied into the exported model folder


def init_for_training(model: nn.Module, seed: int, std: float, n_layers: int, scale_outputs: bool = True) -> None:
    """herd's pretraining init: N(0, std) for matrices, ones for norms, zeros for biases, and (with
    ``scale_outputs``) the projections that write into the residual stream (wo, w2) scaled by
    1/sqrt(2 * n_layers) (GPT-2)."""
    init_weights(model, seed=seed, std=std)
    if not scale_outputs:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "w2.weight", "experts.w2")):
                p.mul_(1 / math.sqrt(2 * n_layers))


def load_start(module: nn.Module, path: Path, key: str, what: str) -> dict[str, str]:
    """A module's starting weights (the recipe's ``key``) from a .safetensors file: every tensor
    present, each of its shape; else a CheckpointError naming the field and the file. Returns the
    file's metadata (what `save_start` was given), read in the same pass."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (OSError, ValueError, SafetensorError) as e:  # missing file, not a safetensors file
        raise CheckpointError(f"{key}: {path}: not a readable .safetensors file ({e})") from None
    check_tensors(f"{key}: {path}", weights, module.state_dict(), what)
    module.load_state_dict(weights)
    return metadata


def save_start(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A module's weights as a .safetensors file `load_start` reads back (a recipe's model.text_init /
    model.vision_init), written through a .partial file so a run cut short leaves none half-written."""
    from safetensors.torch import save_file
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def build(cfg: TrainConfig) -> Built:
    import herd  # herd.load: the facade sits above train/
    m = cfg.model
    if cfg.job == "pretrain":
        if m.preset:
            mcfg = preset(m.preset)
            default_tok = None
        else:
            mcfg = from_hf_config(json.loads(Path(m.config).read_text()), m.config)
            default_tok = Path(m.config).parent
        if m.tokenizer:
            tok = Tokenizer.from_hf_json(m.tokenizer) if m.tokenizer.endswith(".json") else \
                Tokenizer.from_tiktoken_file(m.tokenizer)
        elif default_tok is not None and any((default_tok / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            tok = Tokenizer.from_folder(default_tok, mcfg.text.vocab_size)
        else:
            tok = Tokenizer.bundled()
        if tok.vocab_size != mcfg.text.vocab_size:
            raise ValueError(f"model: tokenizer has {tok.vocab_size} ids but the architecture's vocab_size is "
                             f"{mcfg.text.vocab_size}")
        model = TextModel(mcfg.text)
        init_for_training(model, cfg.seed, m.init_std, mcfg.text.n_layers, m.scale_output_init)
        if m.text_init:
            load_start(model, Path(m.text_init), "model.text_init", "this decoder's weights")
        vision = None
        if mcfg.vision is not None and m.vision:
            vision = VisionModel(mcfg.vision, mcfg.text.dim)
            init_for_training(vision, cfg.seed + 1, m.init_std, mcfg.vision.n_layers)
            if m.vision_init:
                load_start(vision, Path(m.vision_init), "model.vision_init", "this encoder's weights")
        base = m.preset or m.config
        folder = default_tok
        known = folder_max_tiles(folder) if folder is not None else None
        max_tiles = known or DEFAULT_MAX_TILES
        if vision is not None and folder is not None and known is None:
            # The tiling decides how many image tokens a picture becomes: say when it is a guess.
            missing = ("no preprocessor_config.json" if not (folder / "preprocessor_config.json").exists()
                       else "no max_patches in the preprocessor_config.json")
            warnings.warn(f"model.config: {missing} beside {m.config}: pictures are cut into up to {max_tiles} "
                          f"tiles (Llama 4's default max_patches)", stacklevel=2)
    else:
        # QLoRA: the base quantized tensor by tensor as it loads, so it never exists whole in float32.
        quantize = dict(quantize=m.quantize, quantize_group=m.quantize_group,
                        quantize_modules=tuple(m.quantize_modules)) if m.quantize else {}
        try:
            llm = herd.load(m.checkpoint, dtype="float32", device="cpu", vision=m.vision, progress=cfg.train.progress,
                            **quantize)
        except CheckpointError as e:
            raise CheckpointError(f"model.checkpoint: {e}") from None
        model, vision, tok, mcfg, base = llm.model, llm.vision, llm.tokenizer, llm.config, m.checkpoint
        # llm.source: the folder itself, also for a name herd.load knows ("herd-tiny"), whose tokenizer
        # and processor configs the export carries along.
        folder, max_tiles = Path(llm.source), llm.tiler.max_tiles if llm.tiler is not None else DEFAULT_MAX_TILES
        if isinstance(model.output, nn.Linear):  # not when quantized
            model.output.weight.data = model.output.weight.data.contiguous()  # inference may keep it column-major
    device = torch.device(cfg.device)
    model.to(device).train().requires_grad_(cfg.job != "lora")
    if vision is not None:
        vision.to(device).train().requires_grad_(cfg.job != "lora")
    if cfg.job == "lora":
        add_adapters(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.seed)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    tiler = ImageTiler(mcfg.vision, max_tiles) if vision is not None else None
    tok = ChatTokenizer.of(tok, tiler)
    # Passed on to the export: the tokenizer and the processor / chat-template files beside the architecture.
    return Built(model, vision, tok, tiler, base, carried_files(folder, tok))


def prepare_data(cfg: TrainConfig, tok, world: World) -> tuple[PackedData, PackedData | None]:
    d = cfg.data
    cache = Path(d.cache_dir or Path(cfg.out_dir) / "data")
    if tok.image_processor is not None:  # tokenising needs each image's tile layout, not its pixels
        tok = ChatTokenizer.of(tok, tok.image_processor.layout_only())
    encoder = Encoder(tok, text_field=d.text_field)
    train_files = expand_sources(d.train, "data.train")
    val_files = expand_sources(d.val, "data.val") if d.val else []
    if world.main:  # one process tokenises; the others wait and map the result
        tokenise(train_files, cache / "train", encoder, d.doc_separator, cfg.train.progress)
        if val_files:
            tokenise(val_files, cache / "val", encoder, d.doc_separator, cfg.train.progress)
    world.barrier()
    train_docs = Documents(cache / "train")
    if val_files:
        val_docs = Documents(cache / "val")
        train_ids, val_ids = np.arange(len(train_docs)), np.arange(len(val_docs))
    else:
        val_docs = train_docs
        train_ids, val_ids = split_documents(len(train_docs), d.val_fraction, cfg.seed)
    train = PackedData(train_docs, train_ids, d.seq_len, cfg.seed if d.shuffle else None)
    val = PackedData(val_docs, val_ids, d.seq_len, None) if len(val_ids) else None
    return train, val


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float, lr: float,
                 vision_lr_ratio: float = 1.0) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, the class token or 1-D parameters); the
    vision encoder's parameters (named "vision.*") at lr * vision_lr_ratio. Empty groups are left out."""
    def decays(n: str, p: nn.Parameter) -> bool:
        return p.dim() >= 2 and not n.endswith(("pos_embed", "class_token"))
    groups = []
    for vision, rate in ((False, lr), (True, lr * vision_lr_ratio)):
        for decay in (True, False):
            ps = [p for n, p in params if n.startswith("vision.") == vision and decays(n, p) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": rate})
    return groups


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def router_losses(model: TextModel, valid_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(load-balancing loss, z-loss) averaged over MoE layers, and per-layer expert token counts,
    from the router logits of the last forward (real tokens only, padding excluded)."""
    aux, z, counts, n = 0.0, 0.0, [], 0
    for m in model.modules():
        if not isinstance(m, MoE) or m.router_stats is None:
            continue
        logits_NE, ids_NK = m.router_stats
        logits_NE, ids_NK = logits_NE[valid_N].float(), ids_NK[valid_N]
        E = logits_NE.shape[1]
        hits = torch.bincount(ids_NK.flatten(), minlength=E)
        f = hits.float() / max(1, ids_NK.numel())  # share of routed (token, expert) pairs
        P = torch.softmax(logits_NE, dim=-1).mean(0)  # mean router probability
        aux = aux + E * (f * P).sum()
        z = z + torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        counts.append(hits.tolist())
        n += 1
        m.router_stats = None
    if n == 0:
        zero = torch.zeros(())
        return zero, zero, []
    return aux / n, z / n, counts


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, world: World) -> float:
    """Global gradient norm over all ranks (FSDP and tensor-parallel shards and expert-parallel
    experts are disjoint pieces, so their squared norms add up; a piece several ranks hold alike
    counts once), and every gradient scaled to at most ``max_norm``."""
    from herd.train.parallel import copies, local_tensor
    grads = [p.grad for p in params if p.grad is not None]
    local = [local_tensor(g) for g in grads]
    sq = float(sum(n.double() ** 2 / copies(g, world) for n, g in zip(torch._foreach_norm(local), grads))) \
        if grads else 0.0
    norm = math.sqrt(world.sum(sq)[0])
    if max_norm > 0 and norm > max_norm:
        for g in local:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.world = init_world(cfg.distributed.backend, cfg.device, cfg.distributed.tensor_parallel)
        if self.world.size > 1 and cfg.model.quantize:  # FSDP and expert parallelism shard parameters, not buffers
            raise TrainConfigError(f"model.quantize: a quantized base trains in one process so far; this run has "
                                   f"{self.world.size} (drop model.quantize, or run one process)")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.built = build(cfg)
        self.model, self.vision = self.built.model, self.built.vision
        self.train_data, self.val_data = prepare_data(cfg, self.built.tokenizer, self.world)
        self.patch_id = self.built.tokenizer.token_id("<|patch|>")
        W = self.world.size
        self.unreduced: list[nn.Parameter] = []
        if W > 1:
            ep = cfg.distributed.expert_parallel and self.world.tp == 1 and \
                any(isinstance(m, MoE) for m in self.model.modules())
            if self.world.tp > 1:
                apply_tensor_parallel(self.model, self.world)
            if ep:
                shard_experts(self.model, self.world)
                self.unreduced = [p for m in self.model.modules() if isinstance(m, MoE) for p in m.experts.parameters()]
            apply_fsdp(self.model, self.vision, self.world, cfg.device, ep)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.vision is not None:
            named += [("vision." + n, p) for n, p in self.vision.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(named, o.weight_decay, o.lr, o.vision_lr_ratio), lr=o.lr,
                                     betas=(o.beta1, o.beta2),
                                     eps=o.eps, **({"fused": True} if W == 1 else {"foreach": False}))
        t = cfg.train
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, o.warmup_steps, t.steps, o.min_lr_ratio))
        self.rows_per_step = t.micro_batch * t.grad_accum * self.world.dp_size
        self.metrics = Metrics(self.out, enabled=self.world.main)
        self.step = 0
        self.checkpointed = {"": self.model, "vision.": self.vision}  # key prefix -> module
        resume = ckpt.latest(self.out)
        if resume is not None:
            self.step = ckpt.restore(resume, self.checkpointed, self.opt, self.sched, self.world,
                                     trainable_only=cfg.job == "lora")
            self.metrics.truncate(self.step)
        if self.world.main:
            (self.out / "config.json").write_text(json.dumps(as_dict(cfg), indent=2))

    # -- one step --------------------------------------------------------------------------------

    def _rows(self, step: int, micro: int) -> list[int]:
        t, W = self.cfg.train, self.world.dp_size  # the tp ranks of a dp group share its rows
        first = step * self.rows_per_step + (micro * W + self.world.dp_rank) * t.micro_batch
        return list(range(first, first + t.micro_batch))

    def _forward(self, batch: Batch) -> torch.Tensor:
        dev = torch.device(self.cfg.device)
        tokens = batch.tokens.to(dev)
        mask, feats, unused = None, None, 0.0
        if batch.images:
            if self.vision is None:
                raise DataError("training rows hold images but the model has no vision encoder")
            tiles = torch.cat([self.built.tiler(src, i)[0] for i, src in enumerate(batch.images)]).to(dev)
            feats = self.vision(tiles).flatten(0, 1)
            mask = tokens == self.patch_id
        elif self.vision is not None and self.world.size > 1:
            # Every rank must run the (FSDP-sharded) encoder each step, or the collectives mismatch.
            S = self.vision.cfg.image_size
            unused = 0.0 * self.vision(torch.zeros(1, 3, S, S, device=dev)).sum()
        return summed_loss(self.model, tokens, batch.targets.to(dev), mask, feats, segments_BT=batch.segments.to(dev),
                           positions_BT=batch.positions.to(dev)) + unused

    def _autocast(self):
        """bf16 autocast when train.dtype says so (float32 master weights), else a no-op context."""
        return torch.autocast(torch.device(self.cfg.device).type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.dtype == "bfloat16")

    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        step = self.step
        all_rows = range(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        n_targets = self.train_data.count_targets(list(all_rows))  # the whole step's, on every rank
        if n_targets == 0:
            raise DataError(f"step {step}: its {self.rows_per_step} rows hold no target token")
        loss_sum = aux_sum = z_sum = 0.0
        counts = None
        tokens = 0
        n_micro = t.grad_accum * self.world.dp_size
        for micro in range(t.grad_accum):
            batch = self.train_data.batch(self._rows(step, micro))
            real = batch.segments >= 0  # not padding
            tokens += int(real.sum())
            with self._autocast():
                total = self._forward(batch)
            aux, z, c = router_losses(self.model, real.flatten().to(total.device))
            loss = total / n_targets + (cfg.moe.aux_loss * aux + cfg.moe.z_loss * z) / n_micro
            (loss * self.world.dp_size).backward()  # FSDP averages over dp groups; we want their sum
            loss_sum += float(total.detach())
            aux_sum, z_sum = aux_sum + float(aux.detach()), z_sum + float(z.detach())
            counts = c if counts is None else [[a + b for a, b in zip(x, y)] for x, y in zip(counts, c)]
        for p in self.unreduced:  # expert-parallel weights: complete on their owner, not averaged
            if p.grad is not None:
                p.grad.div_(self.world.size)
        grad_norm = clip_grad_norm(self.params, cfg.optim.grad_clip, self.world)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        loss_sum, aux_sum, z_sum, tokens = self.world.dp_sum(loss_sum, aux_sum, z_sum, tokens)
        self.step += 1
        out = {"step": self.step, "loss": loss_sum / n_targets, "lr": self.opt.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "tokens": int(tokens)}
        if counts:
            out |= {"aux_loss": aux_sum / n_micro, "z_loss": z_sum / n_micro, "expert_tokens": counts}
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out mean token loss and perplexity over the first eval_rows rows (all ranks share them)."""
        if self.val_data is None:
            return {}
        n_rows = self.val_data.rows_per_epoch if not self.cfg.train.eval_rows else \
            min(self.cfg.train.eval_rows, self.val_data.rows_per_epoch)
        self.model.eval()
        if self.vision is not None:
            self.vision.eval()
        total = count = 0.0
        mb = self.cfg.train.micro_batch
        W = self.world.dp_size
        mine = list(range(self.world.dp_rank * mb, n_rows, mb * W))
        # Every rank runs the same number of forwards (FSDP collectives), the last ones possibly empty.
        rounds = -(-n_rows // (mb * W))
        for i in range(rounds):
            rows = list(range(mine[i], min(mine[i] + mb, n_rows))) if i < len(mine) else []
            batch = self.val_data.batch(rows or [0])
            with self._autocast():
                s = float(self._forward(batch).detach())
            if rows:
                total, count = total + s, count + batch.n_targets
        self.model.train()
        if self.vision is not None:
            self.vision.train()
        total, count = self.world.dp_sum(total, count)
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # -- the run ---------------------------------------------------------------------------------

    def save(self) -> Path:
        return ckpt.save(self.out, self.step, self.checkpointed, self.opt, self.sched, self.world,
                         self.cfg.train.keep_checkpoints, trainable_only=self.cfg.job == "lora")

    def run(self, stop_after: int | None = None) -> Path | None:
        """Train to cfg.train.steps (or stop after ``stop_after`` steps, checkpointed); returns the
        exported model folder at the end of training."""
        t = self.cfg.train
        end = t.steps if stop_after is None else min(t.steps, stop_after)
        bar = self.metrics.progress(self.step, t.steps, t.progress)
        started, tokens_done = time.perf_counter(), 0
        if self.step == 0 and t.eval_every:
            self.metrics.log({"step": 0, **self.evaluate()})  # where the held-out loss starts
        while self.step < end:
            row = self.train_step()
            tokens_done += row["tokens"]
            row["tokens_per_s"] = tokens_done / (time.perf_counter() - started)
            if t.eval_every and self.step % t.eval_every == 0 or self.step == t.steps:
                row |= self.evaluate()
            if self.step % t.log_every == 0 or "eval_loss" in row:
                self.metrics.log(row)
            bar.update(row)
            if t.save_every and self.step % t.save_every == 0 or self.step == end:
                self.save()
        bar.close()
        self.metrics.plot()
        return self.export() if self.step == t.steps else None

    def export(self) -> Path:
        """The trained model in Hugging Face format (OUT_DIR/final), and LoRA adapters (OUT_DIR/adapters)."""
        from herd.checkpoint.adapters import save_adapters
        from herd.checkpoint.load import save_hf
        cfg = self.cfg
        quantized = bool(cfg.model.quantize)  # QLoRA, in one process (checked at the start)
        if quantized and not cfg.lora.merge:  # the adapters alone: no full-precision model is ever built
            return save_adapters(self.model, _fresh(self.out / "adapters"), cfg.lora.rank, cfg.lora.alpha,
                                 cfg.lora.targets, self.built.base)
        # QLoRA: the dequantized base, a new float32 copy that the export model takes over below (assign).
        state = plain_state(self.model, dequantized=True) if quantized else gather_state(self.model, self.world)
        vision_state = None
        if self.vision is not None:
            from herd.train.parallel import full_tensor
            vision_state = {k: full_tensor(v).detach().cpu() for k, v in self.vision.state_dict().items()}
        if not self.world.main:
            self.world.barrier()
            return self.out / "final"
        with torch.device("meta" if quantized else "cpu"):
            model = TextModel(self.model.cfg)
        if cfg.job == "lora":
            add_adapters(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        model.load_state_dict(state, assign=quantized)
        vision = None
        if vision_state is not None:
            vision = VisionModel(self.vision.cfg, model.cfg.dim)
            vision.load_state_dict(vision_state)
        final = self.out / "final"
        if cfg.job == "lora":
            save_adapters(model, _fresh(self.out / "adapters"), cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets,
                          self.built.base)
            if not cfg.lora.merge:
                self.world.barrier()
                return self.out / "adapters"
            merge(model)
        save_hf(model, _fresh(final), vision=vision, extra_files=self.built.extra_files,
                special_tokens=self.built.tokenizer.special_tokens)
        self.world.barrier()
        return final


def _fresh(folder: Path) -> Path:
    import shutil
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path | None:
    """Run (or resume) the training job a config describes."""
    return Trainer(cfg).run(stop_after)
