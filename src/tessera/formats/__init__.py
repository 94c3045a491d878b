"""On-disk formats and serving engines: config.json translation (llama / nemotron-nas), and the rules of what each
engine can load. `tessera.arch.ArchSpec` keeps the shape and its arithmetic; this package speaks to the outside."""

from tessera.formats.engines import ENGINES, Incompatibility, incompatibilities, round_ffn_width
from tessera.formats.hf_config import (
    NAS_FFN_MULTIPLE,
    SUPPORTED_MODEL_TYPES,
    config_json,
    ffn_mult_for,
    from_hf_config,
    nas_ffn_width,
    read_config,
    to_hf_config,
)

__all__ = [
    "ENGINES", "NAS_FFN_MULTIPLE", "SUPPORTED_MODEL_TYPES", "Incompatibility", "config_json", "ffn_mult_for",
    "from_hf_config", "incompatibilities", "nas_ffn_width", "read_config", "round_ffn_width", "to_hf_config",
]
