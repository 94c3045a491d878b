"""tessera: turn a large Llama-family parent LLM into smaller, faster children that keep its accuracy."""

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec, RopeScaling
from tessera.checkpoint import fingerprint, load, save
from tessera.errors import TesseraError
from tessera.generate import generate, generate_text
from tessera.model import Transformer

__version__ = "0.1.0"

# Register the nemotron-nas (DeciLM) classes with transformers so AutoModelForCausalLM loads children
# without trust_remote_code. Cheap and optional: tessera itself does not need transformers to run.
try:
    from tessera import hf as _hf

    _hf.register()
except ImportError:  # pragma: no cover - transformers is a declared dependency
    pass

__all__ = [
    "ArchSpec", "AttentionSpec", "BlockSpec", "FFNSpec", "RopeScaling", "Transformer", "TesseraError",
    "load", "save", "fingerprint", "generate", "generate_text",
]
