"""Quantization schemes as data, in the compressed-tensors vocabulary.

A `Scheme` says which Linear layers are quantized (`targets`, `ignore`) and how (`weights`, `input_activations`,
optional `kv_cache`), each a `QuantArgs` with exactly compressed-tensors' fields (`num_bits`, `type`, `strategy`,
`group_size`, `dynamic`, `symmetric`, `observer`), so a scheme is written to `config.json` as it is and read back
from any compressed-tensors checkpoint. The presets:

* `fp8`: E4M3 weights per tensor (or per channel), static per-tensor E4M3 activations (calibrated scale);
* `fp8-dynamic`: E4M3 weights per output channel, E4M3 activations scaled per token at run time (no calibration);
* `nvfp4`: E2M1 weights in groups of 16 with E4M3 group scales and an FP32 global scale; activations E2M1 per
  group of 16 with group scales computed at run time (`dynamic: "local"`) under a calibrated global scale;
* `nvfp4-weight-only`: the NVFP4 weights, activations left at model precision.
FP8 KV-cache scales (per-tensor `k_scale` / `v_scale`) are an option on any scheme (`kv_cache=True`).

Default targets are the Linear layers inside the transformer blocks (`linear_attn` / `linear_mlp` included);
`lm_head` (and the embeddings, which are not Linear) are ignored. `ignore` entries are module names, a name
prefix ending in `.`, or `re:` regular expressions, as in compressed-tensors.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from tessera.errors import TesseraError

STRATEGIES = ("tensor", "channel", "group", "tensor_group", "token")
OBSERVERS = ("minmax", "mse")
FORMATS = ("float-quantized", "nvfp4-pack-quantized")


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor kind is quantized (compressed-tensors' `QuantizationArgs`)."""

    num_bits: int
    type: str = "float"
    strategy: str = "tensor"
    group_size: int | None = None
    dynamic: bool | str = False  # True: per call; "local": group scales per call under a calibrated global scale
    symmetric: bool = True
    observer: str | None = "minmax"

    def __post_init__(self):
        if (self.num_bits, self.type) not in ((8, "float"), (4, "float")):
            raise TesseraError(f"{self.num_bits}-bit {self.type} quantization is not supported; use 8-bit float (FP8 "
                               "E4M3) or 4-bit float (NVFP4 E2M1)")
        if self.strategy not in STRATEGIES:
            raise TesseraError(f"quantization strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.strategy in ("group", "tensor_group") and (self.group_size is None or self.group_size < 1):
            raise TesseraError(f"strategy {self.strategy!r} needs a positive group_size (NVFP4 uses 16)")
        if self.num_bits == 4 and self.strategy != "tensor_group":
            raise TesseraError("4-bit float (NVFP4) needs strategy 'tensor_group' with group_size 16")
        if not self.symmetric:
            raise TesseraError("only symmetric float quantization is supported (symmetric: true)")
        if self.dynamic not in (True, False, "local"):
            raise TesseraError(f"dynamic {self.dynamic!r}: use true, false or \"local\"")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise TesseraError(f"observer {self.observer!r}: use one of {', '.join(OBSERVERS)}")

    @property
    def fp4(self) -> bool:
        return self.num_bits == 4

    def to_dict(self) -> dict[str, Any]:
        """As compressed-tensors dumps its QuantizationArgs (E4M3 group scales named for NVFP4)."""
        d = {k: v for k, v in asdict(self).items() if not (k == "observer" and v is None)}
        if self.fp4:
            d["scale_dtype"] = "torch.float8_e4m3fn"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantArgs | None:
        if d is None:
            return None
        fields = ("num_bits", "type", "strategy", "group_size", "dynamic", "symmetric", "observer")
        known = {k: d[k] for k in fields if k in d}
        if known.get("observer") not in (None, *OBSERVERS):
            known["observer"] = "minmax"  # the library's names (e.g. "static_minmax", "memoryless") mean min-max here
        return cls(**known)


@dataclass(frozen=True)
class Scheme:
    """Which Linear layers are quantized and how; `format` is the compressed-tensors storage format."""

    name: str
    weights: QuantArgs
    input_activations: QuantArgs | None = None
    kv_cache: QuantArgs | None = None
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    observer: str = "minmax"  # scale search for static scales: min-max or MSE-optimal
    format: str = field(default="float-quantized")

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise TesseraError(f"observer {self.observer!r}: use one of {', '.join(OBSERVERS)}")
        if self.format not in FORMATS:
            raise TesseraError(f"format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.weights.strategy == "token" or self.weights.dynamic:
            raise TesseraError("weights are quantized statically (per tensor, channel or group), never per token")
        a = self.input_activations
        if a is not None and a.strategy == "channel":
            raise TesseraError("activations are quantized per tensor, per token or per group, not per channel")
        if a is not None and a.strategy == "token" and a.dynamic is not True:
            raise TesseraError("per-token activation scales are dynamic by nature: set dynamic: true")

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales, NVFP4 global input scales or KV-cache scales come from calibration text."""
        a = self.input_activations
        return (a is not None and a.dynamic is not True) or self.kv_cache is not None

    @property
    def group_size(self) -> int | None:
        return self.weights.group_size

    def with_options(self, *, ignore: tuple[str, ...] | list[str] = (), observer: str | None = None,
                     kv_cache: bool | None = None, weight_strategy: str | None = None) -> Scheme:
        """This scheme with more ignored layers, another observer, FP8 KV-cache scales, or (FP8) weight strategy."""
        s = replace(self, ignore=tuple(dict.fromkeys((*self.ignore, *ignore))))
        if observer is not None:
            s = replace(s, observer=observer)
        if kv_cache is not None:
            s = replace(s, kv_cache=FP8_KV if kv_cache else None)
        if weight_strategy is not None:
            if self.weights.fp4 or weight_strategy not in ("tensor", "channel"):
                raise TesseraError(f"weight strategy {weight_strategy!r}: FP8 weights are per 'tensor' or 'channel'; "
                                   "NVFP4 weights are always in groups of 16")
            s = replace(s, weights=replace(s.weights, strategy=weight_strategy))
        return s

    def to_config_group(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "weights": self.weights.to_dict(),
                "input_activations": None if self.input_activations is None else self.input_activations.to_dict(),
                "output_activations": None, "format": self.format}


FP8_KV = QuantArgs(8, "float", "tensor", dynamic=False)
_FP8_W_TENSOR = QuantArgs(8, "float", "tensor")
_FP8_W_CHANNEL = QuantArgs(8, "float", "channel")
_FP4_W = QuantArgs(4, "float", "tensor_group", group_size=16)

SCHEMES: dict[str, Scheme] = {
    "fp8": Scheme("fp8", _FP8_W_TENSOR, QuantArgs(8, "float", "tensor", dynamic=False)),
    "fp8-dynamic": Scheme("fp8-dynamic", _FP8_W_CHANNEL, QuantArgs(8, "float", "token", dynamic=True, observer=None)),
    "nvfp4": Scheme("nvfp4", _FP4_W, QuantArgs(4, "float", "tensor_group", group_size=16, dynamic="local"),
                    format="nvfp4-pack-quantized"),
    "nvfp4-weight-only": Scheme("nvfp4-weight-only", _FP4_W, None, format="nvfp4-pack-quantized"),
}


def get_scheme(name: str | Scheme) -> Scheme:
    """A preset by name (or a Scheme as is); an unknown name is one clear error."""
    if isinstance(name, Scheme):
        return name
    if name not in SCHEMES:
        raise TesseraError(f"unknown quantization scheme {name!r}: use one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def scheme_name(weights: QuantArgs, acts: QuantArgs | None) -> str:
    """The preset these args correspond to (for inspect / provenance), or 'custom'."""
    for s in SCHEMES.values():
        if replace(s.weights, observer=None) == replace(weights, observer=None) and (
                (s.input_activations is None and acts is None)
                or (s.input_activations is not None and acts is not None
                    and replace(s.input_activations, observer=None) == replace(acts, observer=None))):
            return s.name
    if weights.num_bits == 8 and weights.strategy == "channel" and acts is not None and acts.strategy == "tensor":
        return "fp8"
    return "custom"


# ---------------------------------------------------------------------------- targets
def _matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None or re.search(pattern[3:], name) is not None
    if pattern == "Linear":
        return isinstance(module, nn.Linear)
    if pattern.endswith("."):
        return name.startswith(pattern)
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, scheme: Scheme) -> dict[str, nn.Linear]:
    """The Linear layers `scheme` quantizes in `model`, by name; refuses targets or ignores that match nothing and
    widths the group size does not divide, each with one line."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for t in scheme.targets:
        hits = {n: m for n, m in linears.items() if _matches(n, m, t)}
        if not hits:
            raise TesseraError(f"quantization target {t!r} matches no Linear layer; targets are 'Linear', a module "
                               "name such as 'model.layers.0.mlp.down_proj', or 're:<regex>'")
        chosen.update(hits)
    for ig in scheme.ignore:
        hit = [n for n in chosen if _matches(n, chosen[n], ig)]
        if not hit and not any(_matches(n, m, ig) for n, m in model.named_modules()) and ig != "lm_head":
            raise TesseraError(f"--ignore {ig!r} matches no layer of this model; pass a module name such as "
                               "'model.layers.0.mlp.down_proj', a prefix ending in '.', or 're:<regex>'")
        for n in hit:
            del chosen[n]
    if not chosen:
        raise TesseraError("the scheme's targets minus --ignore leave no Linear layer to quantize; ignore fewer layers")
    for n, m in chosen.items():
        for args, width, what in ((scheme.weights, m.in_features, "input width"),):
            if args.group_size and width % args.group_size:
                raise TesseraError(f"{n}: {what} {width} is not a multiple of the group size {args.group_size}; "
                                   f"--ignore {n} or choose widths divisible by {args.group_size}")
    return chosen
