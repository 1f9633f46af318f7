"""herd: Meta's Llama 4 family in plain, fast PyTorch.

    import herd
    llm = herd.load("path/to/checkpoint-or-preset", dtype="float32", device="cpu")
    llm.logits(llm.tokenizer.encode("Hello"))
"""

from herd.checkpoint.errors import CheckpointError
from herd.config import PRESETS, ConfigError, ModelConfig, TextConfig

__all__ = ["load", "LLM", "PRESETS", "ModelConfig", "TextConfig", "CheckpointError", "ConfigError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `load` and `LLM` pull in torch models, tokenizers and loaders; import them on first use so
    # `import herd.config` (and `herd --help`) stay light.
    if name in ("load", "LLM"):
        from herd import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
