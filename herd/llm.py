"""`herd.load` and the `LLM` handle users hold: config + tokenizer + model on one device."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from herd import kernels as kernels_module
from herd.kernels import quant
from herd.checkpoint.adapters import load_adapters
from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.folder import carried_files, folder_max_tiles
from herd.checkpoint.load import load_model, quantization, read_config, save_hf, stored_quantized
from herd.config import PRESETS, ModelConfig, preset
from herd.engine import prompts as prompting
from herd.engine.cache import kv_cache_bytes, resolve_kv_dtype
from herd.engine.constrain import json_grammar
from herd.engine.generate import Engine, Sampling
from herd.model.init import init_weights
from herd.model.transformer import TextModel
from herd.model.vision import VisionModel
from herd.bundled import model_folder
from herd.tokenizer.chat_format import ChatPrompt, ChatTokenizer
from herd.tokenizer.tokenizer import Tokenizer, TokenizerError
from herd.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TILES, ImageTiler

DEFAULT_MAX_IMAGES = 64  # images per prompt
_ENCODE_TILES = 16  # tiles per vision-encoder batch: bounds activation memory for many-image prompts

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name ('float32', 'bfloat16', 'float16') or a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")


class LLM:
    """A loaded Llama 4 model: ``llm.config``, ``llm.tokenizer``, ``llm.logits(ids)``."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: TextModel, source: str,
                 vision: VisionModel | None = None, *, max_images: int = DEFAULT_MAX_IMAGES,
                 max_tiles: int = DEFAULT_MAX_TILES, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.config, self.model, self.source, self.vision = config, model, source, vision
        self.tiler = ImageTiler(config.vision, max_tiles, max_pixels) if vision is not None else None
        # The chat format over this model's tokenizer, told how to tile images for this model.
        self.tokenizer = ChatTokenizer.of(tokenizer, self.tiler, max_images,
                                          None if vision is not None else self._no_images_reason())
        # The float dtype cached attention runs in: the weights' one; herd.load sets the kernels'
        # choice. It is the KV cache's dtype, unless that is int8, whose entries are read back in it.
        self.kv_read_dtype = self.dtype
        self.kv_dtype = self.dtype
        # What makes each request's Engine (herd.distributed sets a tensor-parallel leader's).
        self.engine = Engine

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype, settable by name or torch dtype: a float dtype, or int8 (``"int8"``:
        int8 values with a scale per token and KV head, read back in ``kv_read_dtype``)."""
        return self._kv_dtype

    @kv_dtype.setter
    def kv_dtype(self, dtype: str | torch.dtype) -> None:
        self._kv_dtype = resolve_kv_dtype(dtype)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

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

    # Tokens per prefill segment (bounds activation memory for long prompts); None: the engine's
    # default_prefill_chunk (512 on a CPU in float32, 2048 in half precision, 4096 on a GPU).
    prefill_chunk: int | None = None
    # Prompt-lookup decoding: draft up to this many tokens per step from the prompt and the reply so
    # far, verified in the same forward (0: off). The tokens are the same either way; it pays where
    # replies repeat their prompt (quotes, summaries, code edits).
    speculate: int = 0
    # Automatic prefix caching for `herd serve`: the KV state of recent prompts, up to this many bytes
    # (0: off), reused by prompts that start the same way (herd.engine.prefix).
    prefix_cache_bytes: int = 0

    def memory(self, context: int = 0, batch: int = 1) -> dict[str, int]:
        """Bytes by part: the text weights (``experts``: routed and shared experts; ``other``), the
        vision encoder's, the KV cache for ``batch`` sequences of ``context`` tokens, and the total.
        Exact for the model as loaded, quantization included; a model loaded on the meta device plans
        without memory."""
        return memory(self.model, self.vision, self.kv_dtype, context, batch)

    def kv_cache_bytes(self, context_len: int, batch: int = 1) -> int:
        """Bytes of KV cache herd allocates for ``batch`` sequences of ``context_len`` tokens (in ``kv_dtype``)."""
        return kv_cache_bytes(self.config.text, context_len, batch, self.kv_dtype)

    def generate(self, prompt, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: str | list[str] | None = None,
                 tools: list[dict] | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None,
                 json_schema: dict | bool | None = None):
        """Generate from a string (raw text), token ids, a ChatPrompt (apply_chat_template's, images
        included), or chat messages (images allowed) — or a list of those, batched — and return a Generation (a
        list of them for a batch).

        Greedy at temperature 0; otherwise sampling with top-k / top-p / min-p, reproducible with
        ``seed``. Before either: OpenAI's ``presence_penalty`` / ``frequency_penalty`` over the output,
        the ``repetition_penalty`` of HF and vLLM over prompt and output, ``logit_bias`` {token id: bias}.
        ``json_schema``: the reply is JSON following that schema (True: any JSON object), decoding
        constrained by a grammar (herd.engine.constrain); cut off by ``max_new_tokens``, it may be partial. A row ends at a stop token (<|eot|>, <|eom|>, <|end_of_text|>), a ``stop`` string
        (one, or a list), or ``max_new_tokens``. ``tools``: OpenAI-style tool definitions offered to
        chat messages; read the calls with ``llm.tokenizer.parse_assistant(generation.token_ids)``.
        """
        sampling = self._sampling(temperature, top_k, top_p, min_p, seed, presence_penalty, frequency_penalty,
                                  repetition_penalty, logit_bias, json_schema=json_schema)
        batch = prompting.is_batch(prompt)
        prompts = [self.prepare(p, tools) for p in (prompt if batch else [prompt])]
        out = prompting.generate(self._runner(), prompts, max_new_tokens, sampling, stop)
        return out if batch else out[0]

    def _sampling(self, *args, json_schema: dict | bool | None) -> Sampling:
        """Sampling(*args), with ``json_schema``'s grammar, its biased ids checked against the vocabulary."""
        grammar = None
        if json_schema is not None and json_schema is not False:
            grammar = json_grammar(None if json_schema is True else json_schema, self.tokenizer,
                                   self.config.text.vocab_size)
        sampling = Sampling(*args, grammar=grammar)
        sampling.check_vocab(self.config.text.vocab_size)
        return sampling

    def stream(self, prompt, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: str | list[str] | None = None,
               tools: list[dict] | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None,
               json_schema: dict | bool | None = None):
        """Like generate for one prompt, but yields the text as it is decoded (whole characters only);
        the generator's return value (StopIteration.value) is the finished Generation."""
        sampling = self._sampling(temperature, top_k, top_p, min_p, seed, presence_penalty, frequency_penalty,
                                  repetition_penalty, logit_bias, json_schema=json_schema)
        if prompting.is_batch(prompt):
            raise ValueError("stream takes one prompt; use generate for a batch")
        pieces = prompting.stream(self._runner(), [self.prepare(prompt, tools)], max_new_tokens, sampling, stop)
        while True:
            try:
                _, piece = next(pieces)
            except StopIteration as done:
                return done.value[0]
            yield piece

    def prepare(self, prompt, tools: list[dict] | None = None) -> prompting.Prompt:
        """A prompt as generate takes it -> the engine's Prompt (ids; image features computed)."""
        return prompting.prepare(self.tokenizer, prompt, tools, self.image_features if self.vision is not None else None)

    def _runner(self) -> prompting.Runner:
        return prompting.Runner(self.model, self.tokenizer, self.prefill_chunk, self.kv_dtype, self.kv_read_dtype,
                                self.engine, self.speculate)

    def preprocess_image(self, image, index: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        """An image (PIL image, path, bytes or data: URL) -> (float32 tiles [n, 3, S, S], (rows, cols))."""
        if self.tiler is None:
            raise ValueError(f"image {index}: {self._no_images_reason()}")
        return self.tiler(image, index)

    def _no_images_reason(self) -> str:
        if self.config.vision is not None:
            return f"{self.source} was loaded with vision=False; load it with vision=True to use images"
        return f"{self.source} has no vision encoder (a text-only checkpoint)"

    @torch.inference_mode()
    def logits(self, input_ids, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] (or [T], or lists, or a ChatPrompt) -> float32 logits [B, T, vocab]; full
        forward, no cache.

        ``pixel_values`` [tiles, 3, S, S] are the tiles of all images of the batch in prompt order;
        their features replace the <|patch|> tokens, which must number tiles × tokens per tile.
        """
        if isinstance(input_ids, ChatPrompt):  # apply_chat_template's prompt: its ids and its images
            input_ids, pixel_values = [input_ids.ids], input_ids.pixel_values if pixel_values is None else pixel_values
        ids = self._as_batch(input_ids)
        mask = ids == self.tokenizer.token_id("<|patch|>")
        if pixel_values is None:
            if mask.any():
                raise ValueError(f"input_ids hold {int(mask.sum())} <|patch|> tokens but no pixel_values were given")
            features = None
        else:
            features = self.image_features(pixel_values, int(mask.sum()))
        if self.engine is not Engine:  # a model split over processes runs only the steps its engine plans
            return self._planned_logits(ids, mask if features is not None else None, features)
        return self.model(ids) if features is None else self.model(ids, mask, features)

    def _planned_logits(self, ids: torch.Tensor, mask: torch.Tensor | None,
                        features: torch.Tensor | None) -> torch.Tensor:
        """`logits` through the engine: each row prefilled into a one-row cache, every position's logits."""
        engine = self.engine(self.model, rows=1, max_len=ids.shape[1], prefill_chunk=self.prefill_chunk,
                             kv_dtype=self.kv_dtype, kv_read_dtype=self.kv_read_dtype)
        out, used = [], 0
        for b in range(ids.shape[0]):
            k = 0 if mask is None else int(mask[b].sum())
            out.append(engine.prefill_logits(0, ids[b].tolist(), None if mask is None else mask[b],
                                             None if not k else features[used:used + k]))
            used += k
        return torch.stack(out)

    def image_features(self, pixel_values: torch.Tensor, n_patch_tokens: int | None = None) -> torch.Tensor:
        """Tiles [n, 3, S, S] -> image features [n * tokens per tile, D] in the text width."""
        if self.vision is None:
            raise ValueError(f"pixel_values given, but {self._no_images_reason()}")
        S = self.config.vision.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or \
                tuple(pixel_values.shape[1:]) != (3, S, S) or not pixel_values.is_floating_point():
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a float tensor [tiles, 3, {S}, {S}], got {shape}")
        per_tile = self.tiler.tokens_per_tile
        if n_patch_tokens is not None and n_patch_tokens != pixel_values.shape[0] * per_tile:
            raise ValueError(f"input_ids hold {n_patch_tokens} <|patch|> tokens but pixel_values has "
                             f"{pixel_values.shape[0]} tiles × {per_tile} = {pixel_values.shape[0] * per_tile}")
        with torch.inference_mode():
            pixels = pixel_values.to(self.device)
            feats = [self.vision(pixels[i:i + _ENCODE_TILES]) for i in range(0, pixels.shape[0], _ENCODE_TILES)]
        return torch.cat(feats).flatten(0, 1)

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Write a Hugging Face checkpoint folder that herd.load and transformers both read (with the
        vision encoder, as Llama4ForConditionalGeneration, when the model has one)."""
        extra = carried_files(self.source, self.tokenizer)
        return save_hf(self.model, folder, dtype=None if dtype is None else resolve_dtype(dtype), extra_files=extra,
                       vision=self.vision, special_tokens=self.tokenizer.special_tokens)


def load(path_or_preset: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu",
         *, seed: int = 0, progress: bool = True, vision: bool = True, max_images: int = DEFAULT_MAX_IMAGES,
         max_tiles: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
         adapters: str | os.PathLike | None = None, kernels: bool = True, compile: bool = False,
         kv_dtype: str | torch.dtype | None = None, quantize: str | None = None, quantize_group: int = 128,
         quantize_modules: tuple[str, ...] = quant.DEFAULT_MODULES,
         shard: Callable[[TextModel], Mapping[str, tuple[int, int, int, int]]] | None = None) -> LLM:
    """Load a Hugging Face folder, a Meta folder, an embedded model ("herd-tiny", trained by herd) or
    a preset name (random weights) as an LLM.

    ``adapters``: a folder of LoRA adapters saved by `herd train` (job lora), merged into the weights.

    ``vision=False`` skips a checkpoint's vision encoder (less memory; text prompts only). The image
    limits apply to prompts: images per prompt, tiles per image (default: the checkpoint's
    preprocessor_config.json ``max_patches``, else 16), pixels per image.

    ``quantize`` ('int8': per output channel; 'int4': groups of ``quantize_group`` inputs; 'fp8': float8
    e4m3 per output channel, activations per token, on CUDA GPUs of compute capability 8.9+) stores
    the weights of ``quantize_modules`` (default: the routed and shared experts; also 'dense_ffn',
    'attention', 'output') quantized, each as it loads (see herd.kernels.quant).

    ``kv_dtype``: the KV cache's dtype, ``None`` or ``"auto"`` for the float dtype the kernels pick
    for the device (`herd.kernels.cache_dtype`), or ``"int8"`` (``torch.int8``): int8 values with a
    scale per token and KV head, read back in that float dtype (half a bf16 cache; settable later as
    ``llm.kv_dtype``).

    ``shard(model)``: splits a text model in place into one rank's part (its tensor-parallel shard of
    its pipeline stage's layers) and returns which part of each tensor it kept
    (herd.distributed.steps.load passes it): a checkpoint is then read by those parts only
    (`herd.checkpoint.load.load_model`), a preset's random weights are made whole (and quantized,
    with ``quantize``) and split.

    ``kernels=False`` runs the reference model: no device fast paths (see herd.kernels) and a KV
    cache in the weights' dtype. ``compile=True``: batch-1 decode's output product through a kernel
    torch.compile makes for half-precision weights on a CPU (see `herd.kernels.compile_head`).

    Raises CheckpointError (a ValueError) naming the file, tensor or field at fault; nothing is
    returned half-loaded.
    """
    check_device(device)
    kv = None if kv_dtype is None or kv_dtype == "auto" else resolve_kv_dtype(kv_dtype)  # before any loading
    if compile and not kernels:
        raise ValueError("compile=True is a kernel; it needs kernels=True")
    spec = None
    if quantize is not None:
        spec = quant.QuantSpec(quantize, quantize_group, tuple(quantize_modules))
        if torch.device(device).type not in ("cpu", "meta", "cuda"):
            raise ValueError(f"quantize={quantize!r} runs on the CPU and CUDA; device {device!r} has no quantized "
                             "kernels in herd yet (load in bfloat16, or on the CPU)")
        if quantize == "fp8":
            quant.check_fp8_device(device)
            if resolve_dtype(dtype) != torch.bfloat16:
                raise ValueError("quantize='fp8' runs in bfloat16 (torch._scaled_mm's rowwise kernel); "
                                 "load with dtype='bfloat16'")
        if quantize == "int4" and torch.device(device).type == "cuda" and resolve_dtype(dtype) != torch.bfloat16:
            raise ValueError("quantize='int4' on CUDA runs in bfloat16 (torch's tinygemm kernel); "
                             "load with dtype='bfloat16'")
        if adapters is not None:
            raise ValueError("adapters are merged into full-precision weights; load them without quantize")
    if shard is not None and adapters is not None:
        raise ValueError("adapters are merged into whole weights; merge them before splitting over ranks")
    llm = _load(path_or_preset, dtype, device, seed=seed, progress=progress, vision=vision, max_images=max_images,
                max_tiles=max_tiles, max_pixels=max_pixels, fast=kernels, spec=spec, shard=shard)
    if adapters is not None:
        try:
            load_adapters(llm.model, adapters)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if kernels:
        kernels_module.apply(llm.model, llm.vision)
        llm.kv_read_dtype = llm.kv_dtype = kernels_module.cache_dtype(llm.dtype, llm.device)
        if compile:
            kernels_module.compile_head(llm.model)
    if kv is not None:
        llm.kv_dtype = kv
    return llm


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a ValueError in one line saying what is missing (not torch's assertion deep in a copy)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device torch knows ({e}); use 'cpu' or 'cuda'") from None
    if d.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is a CPU-only build; use 'cpu', "
                             "or install a CUDA build of torch")
        if not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s) here; use 'cpu' "
                             "or another index")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: this machine or torch build has no Apple GPU (MPS); use 'cpu'")
    return d


def _load(path_or_preset, dtype, device, *, seed, progress, vision, max_images, max_tiles, max_pixels, fast,
          spec, shard=None) -> LLM:
    limits = dict(max_images=max_images, max_tiles=DEFAULT_MAX_TILES if max_tiles is None else max_tiles,
                  max_pixels=max_pixels)
    dt = resolve_dtype(dtype)
    name = os.fspath(path_or_preset)
    if name in PRESETS and not Path(name).exists():
        cfg = preset(name)
        tok = Tokenizer.bundled()
        _check_vocab(tok, cfg, f"preset '{name}'")
        with_vision = vision and cfg.vision is not None
        if torch.device(device).type == "meta":
            model, encoder = plan(cfg, dt, spec, vision)
            return LLM(cfg, tok, model, name, encoder, **limits)
        _check_fits(cfg, dt, name)
        model = init_weights(TextModel(cfg.text), seed=seed).to(device=device, dtype=dt)
        if spec is not None:
            quant.to_device(quant.quantize_model(model, spec), device)  # quantized on the CPU
        if shard is not None:
            shard(model)
        encoder = None
        if with_vision:
            encoder = init_weights(VisionModel(cfg.vision, cfg.text.dim), seed=seed + 1).to(device=device, dtype=dt)
            encoder.eval().requires_grad_(False)
        return LLM(cfg, tok, model.eval().requires_grad_(False), name, encoder, **limits)
    name = model_folder(name)
    cfg, fmt = read_config(name)
    only = None
    if spec is None:  # a quantized checkpoint runs as it was quantized
        spec, only = _stored_spec(name, dt, device, progress), set()
    if torch.device(device).type == "meta":  # a plan: shapes and bytes from the config, no weight read
        model, encoder = plan(cfg, dt, spec, vision, None if only is None else stored_quantized(name, cfg))
        return LLM(cfg, Tokenizer.from_folder(name, cfg.text.vocab_size), model, name, encoder, **limits)
    if max_tiles is None:
        limits["max_tiles"] = folder_max_tiles(name) or DEFAULT_MAX_TILES
    try:
        tok = Tokenizer.from_folder(name, cfg.text.vocab_size)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    _check_vocab(tok, cfg, name)
    head = (cfg.text.vocab_size, cfg.text.dim)
    column_major = ("output.weight",) if fast and kernels_module.cpu.head_column_major(head, dt, device) and \
        (spec is None or "output" not in spec.modules) else ()
    model, encoder = load_model(name, cfg, fmt, dtype=dt, device=device, progress=progress, vision=vision,
                                column_major=column_major,
                                quantize=None if spec is None else
                                lambda m, stored, parts: quant.install(m, spec, dt, None if only is None else stored,
                                                                       parts),
                                shard=shard)
    if spec is not None:
        quant.to_device(model, device)  # quantized on the CPU as it loaded; the kernels' layout on ``device``
    return LLM(cfg, tok, model, name, encoder, **limits)


def _stored_spec(folder, dtype: torch.dtype, device, say: bool) -> quant.QuantSpec | None:
    """How to hold a quantized checkpoint's weights when no ``quantize`` is asked: its integer
    weights as they are (int4 groups or int8 channels, the modules it quantized); FP8 weights are
    dequantized to ``dtype`` (a CPU has no FP8 arithmetic; ``quantize='int8'`` keeps 1 byte per weight)."""
    stored = quantization(folder)
    if stored is None:
        return None
    kernels_here = torch.device(device).type in ("cpu", "meta") or (torch.device(device).type == "cuda" and
                                                                     dtype == torch.bfloat16)
    fp8 = [s for s in stored.schemes if s.kind == "float" and s.bits == 8]
    if fp8 and torch.device(device).type == "cuda" and dtype == torch.bfloat16:
        try:
            quant.check_fp8_device(device)
            return quant.QuantSpec("fp8", 128, quant.MODULES)  # FP8 tensor cores: the file's values as they are
        except ValueError:
            pass
    ints = [s for s in stored.schemes if s.kind == "int"] if kernels_here else []
    if not ints:
        if say:
            print(f"herd: {Path(folder).name}: quantized weights dequantized to {str(dtype).removeprefix('torch.')} "
                  "(quantize='int8' keeps one byte per weight)", file=sys.stderr)
        return None
    s = ints[0]
    group = s.group if s.strategy == "group" and s.group in quant.GROUPS else 128
    return quant.QuantSpec("int4" if s.bits == 4 else "int8", group, quant.MODULES)


def plan(cfg: ModelConfig, dtype: torch.dtype, spec: quant.QuantSpec | None = None,
         vision: bool = True, only: set[str] | None = None) -> tuple[TextModel, VisionModel | None]:
    """The text model (quantized per ``spec``, for the weights in ``only`` if given) and vision encoder
    on the meta device: every shape and byte, no memory."""
    with torch.device("meta"):
        model = TextModel(cfg.text).to(dtype)
        if spec is not None:
            quant.install(model, spec, dtype, only)
        encoder = VisionModel(cfg.vision, cfg.text.dim).to(dtype) if vision and cfg.vision is not None else None
    return model, encoder


def memory(model: TextModel, vision: VisionModel | None, kv_dtype: torch.dtype, context: int = 0,
           batch: int = 1) -> dict[str, int]:
    """Bytes by part (see `LLM.memory`) of a model, loaded or planned."""
    experts = other = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if ".experts." in name or ".shared_expert." in name:
            experts += nbytes
        else:
            other += nbytes
    encoder = sum(t.numel() * t.element_size() for t in vision.state_dict().values()) if vision is not None else 0
    kv = kv_cache_bytes(model.cfg, context, batch, kv_dtype) if context else 0
    return {"experts": experts, "other": other, "vision": encoder, "kv_cache": kv,
            "total": experts + other + encoder + kv}


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
