"""Puzzle stage 1: the block library, per-layer attention and FFN variants initialised from the parent, untrained.

A `Variant` is one replacement for one sub-block: a part ("attention" | "ffn"), its spec (`AttentionSpec` /
`FFNSpec`) and the precision its weights are served at ("native", "fp8", "nvfp4"). The variant set is an open
list: precision is one more attribute, so a quantised variant goes through every stage like any other (it shares
the trained weights of its native twin and is fake-quantised where it is built).

Offered per layer (Puzzle, section 3):
* attention: GQA with every KV-head count that divides the query heads and the parent's KV heads (so whole KV
  groups are merged), `linear` (one hidden x hidden matrix), `no_op`;
* FFN: the parent width and fractions of it (default 87/75/50/25/20/10 %, rounded to a multiple the hardware
  likes), `linear`, `no_op`.

Initialisation, no training (`init_variant`):
* FFN width w: the w intermediate channels with the largest contribution mean_t |act_i| * ||W_down[:, i]|| over
  the calibration tokens (act = silu(gate) * up, the input of down_proj), kept in their original order;
* KV heads k: the parent's KV groups merged as Minitron merges them (`tessera.prune.merge_kv_heads`): the groups
  with the most head importance anchor the new groups, the weakest join the strongest, and K and V are averaged
  weighted by each group's importance (so a group that contributes nothing does not disturb the one it joins);
* linear attention: W_o @ W_v with the KV heads repeated to the query heads (attention of a token to itself);
* linear FFN: the least-squares fit of the parent FFN's output on its (normed) input over the calibration tokens;
* the parent's own sub-block: the parent's tensors, so it equals the parent exactly.

A library directory holds `library.json` (parent fingerprint and source, the configuration, per-layer variant
keys, variants left out and why, pairs an engine cannot serve, the calibration data record) and
`stats.safetensors` (per-layer channel contributions and linear-FFN fits). Weights of a variant are derived on
demand from the parent and these statistics, so the library is small and a parent-width variant is exact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.errors import TesseraError
from tessera.io import atomic_dir, read_json
from tessera.model import Block, Transformer

PARTS = ("attention", "ffn")
PRECISIONS = ("native", "fp8", "nvfp4")
LIBRARY_FORMAT = "tessera.puzzle.library"
LIBRARY_VERSION = 1
DEFAULT_FFN_FRACTIONS = (0.87, 0.75, 0.5, 0.25, 0.2, 0.1)
_PREFIX = {"attention": "attn", "ffn": "ffn"}


# ---------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One replacement for the attention or the FFN of a layer; hashable, with a stable string `key`."""

    part: str  # "attention" | "ffn"
    spec: AttentionSpec | FFNSpec
    precision: str = "native"  # "native" | "fp8" | "nvfp4": the weight precision it is served and scored at

    def __post_init__(self):
        if self.part not in PARTS:
            raise TesseraError(f"variant part {self.part!r}: use 'attention' or 'ffn'")
        want = AttentionSpec if self.part == "attention" else FFNSpec
        if not isinstance(self.spec, want):
            raise TesseraError(f"a {self.part} variant needs a {want.__name__}, got {type(self.spec).__name__}")
        if self.precision not in PRECISIONS:
            raise TesseraError(f"variant precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.precision != "native" and self.spec.kind == "no_op":
            raise TesseraError("a no_op variant has no weights to quantise; offer it at native precision only")

    @property
    def key(self) -> str:
        """'attn.gqa-kv3', 'attn.linear', 'attn.no_op', 'ffn.swiglu-768', 'ffn.linear', 'ffn.no_op', '...@fp8'."""
        s = self.spec
        if self.part == "attention":
            body = f"gqa-kv{s.num_kv_heads}" if s.kind == "gqa" else s.kind
        else:
            body = f"swiglu-{s.intermediate_size}" if s.kind == "swiglu" else s.kind
        base = f"{_PREFIX[self.part]}.{body}"
        return base if self.precision == "native" else f"{base}@{self.precision}"

    @staticmethod
    def from_key(key: str) -> Variant:
        base, _, precision = key.partition("@")
        prefix, _, body = base.partition(".")
        try:
            if prefix == "attn":
                if body.startswith("gqa-kv"):
                    return Variant("attention", AttentionSpec("gqa", int(body[6:])), precision or "native")
                return Variant("attention", AttentionSpec(body), precision or "native")
            if prefix == "ffn":
                if body.startswith("swiglu-"):
                    return Variant("ffn", FFNSpec("swiglu", int(body[7:])), precision or "native")
                return Variant("ffn", FFNSpec(body), precision or "native")
        except (ValueError, TesseraError):
            pass
        raise TesseraError(f"{key!r} is not a variant key (e.g. attn.gqa-kv2, attn.linear, ffn.swiglu-768, ffn.no_op, "
                           "ffn.swiglu-768@fp8)")

    @property
    def native(self) -> Variant:
        """The variant whose (trained) weights this one uses: itself without the precision."""
        return replace(self, precision="native")

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def has_weights(self) -> bool:
        return self.spec.kind != "no_op"

    def __str__(self) -> str:
        return self.key


def parent_variants(arch: ArchSpec, layer: int) -> tuple[Variant, Variant]:
    """The parent's own attention and FFN of `layer`, as variants."""
    block = arch.blocks[layer]
    return Variant("attention", block.attention), Variant("ffn", block.ffn)


def block_of(attention: Variant, ffn: Variant) -> BlockSpec:
    return BlockSpec(attention.spec, ffn.spec)


# ---------------------------------------------------------------------------- configuration and variant lists
@dataclass(frozen=True)
class LibraryConfig:
    """Which variants to offer. `kv_heads=None` offers every KV-head count that fits; widths are the parent's width
    times each fraction, rounded to `ffn_multiple` (and to what `engine` serves), plus any explicit `ffn_widths`."""

    kv_heads: tuple[int, ...] | None = None
    ffn_fractions: tuple[float, ...] = DEFAULT_FFN_FRACTIONS
    ffn_widths: tuple[int, ...] = ()
    ffn_multiple: int = 64
    linear_attention: bool = True
    no_op_attention: bool = True
    linear_ffn: bool = True
    no_op_ffn: bool = True
    precisions: tuple[str, ...] = ("native",)
    engine: str | None = None  # "vllm" | "llamacpp" | "transformers": leave out what it cannot serve

    def __post_init__(self):
        for name in ("kv_heads", "ffn_fractions", "ffn_widths", "precisions"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if any(not 0 < f <= 1 for f in self.ffn_fractions):
            raise TesseraError(f"FFN fractions {list(self.ffn_fractions)} must be in (0, 1]; give fractions of the "
                               "parent's width, e.g. 0.5")
        if self.kv_heads is not None and any(k < 1 for k in self.kv_heads):
            raise TesseraError(f"KV-head counts {list(self.kv_heads)} must be >= 1")
        if any(w < 1 for w in self.ffn_widths):
            raise TesseraError(f"FFN widths {list(self.ffn_widths)} must be >= 1")
        if self.ffn_multiple < 1:
            raise TesseraError(f"--ffn-multiple {self.ffn_multiple} must be >= 1")
        if "native" not in self.precisions:
            raise TesseraError("precisions must include 'native' (quantised variants reuse the native weights)")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise TesseraError(f"precision {p!r}: use one of {', '.join(PRECISIONS)}")
        if self.engine is not None:
            from tessera.formats.engines import check_engine

            check_engine(self.engine)


@dataclass(frozen=True)
class LayerVariants:
    attention: tuple[Variant, ...]
    ffn: tuple[Variant, ...]

    def of(self, part: str) -> tuple[Variant, ...]:
        return self.attention if part == "attention" else self.ffn

    @property
    def all(self) -> tuple[Variant, ...]:
        return self.attention + self.ffn


@dataclass(frozen=True)
class Exclusion:
    layer: int
    key: str
    reason: str


@dataclass(frozen=True)
class PairExclusion:
    """An (attention, FFN) pair an engine cannot serve in one layer, though each part alone is fine."""

    layer: int
    attention: str
    ffn: str
    reason: str


def _round_width(width: float, multiple: int, limit: int) -> int:
    return int(min(limit, max(multiple, round(width / multiple) * multiple)))


def _fits(arch: ArchSpec, layer: int, v: Variant) -> str | None:
    """Why `v` cannot be initialised from the parent's `layer`, or None."""
    parent = arch.blocks[layer]
    s = v.spec
    if v.part == "attention":
        p = parent.attention
        if s.kind == "gqa":
            if arch.num_attention_heads % s.num_kv_heads:
                return f"{s.num_kv_heads} KV heads do not divide the {arch.num_attention_heads} query heads"
            if p.kind != "gqa":
                return f"the parent's attention here is {p.kind}, which has no KV heads to pool"
            if p.num_kv_heads % s.num_kv_heads:
                return (f"{s.num_kv_heads} KV heads do not divide the parent's {p.num_kv_heads} (only whole KV groups "
                        "are merged)")
        elif s.kind == "linear" and p.kind == "no_op":
            return "the parent's attention here is no_op (nothing to initialise a linear layer from)"
        return None
    p = parent.ffn
    if s.kind == "swiglu":
        if p.kind != "swiglu":
            return f"the parent's FFN here is {p.kind}, which has no channels to keep"
        if s.intermediate_size > p.intermediate_size:
            return f"width {s.intermediate_size} exceeds the parent's {p.intermediate_size} (pruning cannot grow)"
    elif s.kind == "linear" and p.kind == "no_op":
        return "the parent's FFN here is no_op (nothing to fit a linear layer to)"
    return None


def variant_lists(arch: ArchSpec, cfg: LibraryConfig) -> tuple[list[LayerVariants], list[Exclusion],
                                                                  list[PairExclusion]]:
    """Per-layer variants that fit the parent and the engine, the ones left out (with reasons) and the pairs the
    engine cannot serve together (for the MIP). Refuses, in one line, a requested variant that fits no layer."""
    from tessera.formats.engines import block_reason, round_ffn_width, sub_block_reason

    layers: list[LayerVariants] = []
    excluded: list[Exclusion] = []
    pairs: list[PairExclusion] = []
    requested_kv = cfg.kv_heads
    fitted_kv: set[int] = set()
    fitted_widths: set[int] = set()
    for i, block in enumerate(arch.blocks):
        pa, pf = parent_variants(arch, i)
        # attention candidates
        if requested_kv is None:
            kvs = [k for k in range(1, arch.num_attention_heads + 1) if arch.num_attention_heads % k == 0]
            kvs = [k for k in kvs if block.attention.kind == "gqa" and block.attention.num_kv_heads % k == 0]
        else:
            kvs = list(requested_kv)
        att = [Variant("attention", AttentionSpec("gqa", k)) for k in sorted(set(kvs), reverse=True)]
        if cfg.linear_attention:
            att.append(Variant("attention", AttentionSpec("linear")))
        if cfg.no_op_attention:
            att.append(Variant("attention", AttentionSpec("no_op")))
        # FFN candidates
        ffn = []
        if block.ffn.kind == "swiglu":
            parent_w = block.ffn.intermediate_size
            widths = {_round_width(parent_w * f, cfg.ffn_multiple, parent_w) for f in cfg.ffn_fractions}
            widths |= set(cfg.ffn_widths)
            if cfg.engine is not None:
                widths = {w if w == parent_w else round_ffn_width(w, arch.hidden_size, cfg.engine) for w in widths}
            ffn = [Variant("ffn", FFNSpec("swiglu", w)) for w in sorted(widths, reverse=True)]
        else:
            ffn = [Variant("ffn", FFNSpec("swiglu", w)) for w in sorted(set(cfg.ffn_widths), reverse=True)]
        if cfg.linear_ffn:
            ffn.append(Variant("ffn", FFNSpec("linear")))
        if cfg.no_op_ffn:
            ffn.append(Variant("ffn", FFNSpec("no_op")))
        chosen = {}
        for part, cands, parent in (("attention", att, pa), ("ffn", ffn, pf)):
            keep = [parent]  # the parent's own sub-block is always offered (score 0, exact)
            for v in cands:
                if v == parent or v in keep:
                    continue
                why = _fits(arch, i, v)
                if why is None:
                    if v.part == "attention" and v.kind == "gqa":
                        fitted_kv.add(v.spec.num_kv_heads)
                    if v.part == "ffn" and v.kind == "swiglu":
                        fitted_widths.add(v.spec.intermediate_size)
                    if cfg.engine is not None:
                        why = sub_block_reason(cfg.engine, arch, v.spec)
                        if why:
                            excluded.append(Exclusion(i, v.key, f"{cfg.engine}: {why}"))
                            continue
                    keep.append(v)
                elif requested_kv is not None and v.kind == "gqa":
                    excluded.append(Exclusion(i, v.key, why))
            keep += [replace(v, precision=p) for p in cfg.precisions if p != "native" for v in list(keep)
                     if v.has_weights]
            chosen[part] = tuple(keep)
        lv = LayerVariants(chosen["attention"], chosen["ffn"])
        layers.append(lv)
        if cfg.engine is not None:
            for a in lv.attention:
                for f in lv.ffn:
                    found = block_reason(cfg.engine, arch, block_of(a, f))
                    if found is not None and found[0] == "block":
                        pairs.append(PairExclusion(i, a.key, f.key, f"{cfg.engine}: {found[1]}"))
    if requested_kv is not None:
        bad = sorted(set(requested_kv) - fitted_kv)
        if bad:
            ok = sorted({k for k in range(1, arch.num_attention_heads + 1)
                         if any(_fits(arch, i, Variant("attention", AttentionSpec("gqa", k))) is None
                                for i in range(arch.num_layers))})
            choices = ", ".join(map(str, ok)) or "none"
            raise TesseraError(f"--kv-heads {','.join(map(str, bad))} does not fit the parent ({arch.num_attention_heads} "
                               f"query heads, {_kv_summary(arch)} KV heads); choose from {choices}")
    bad_w = sorted(set(cfg.ffn_widths) - fitted_widths)
    if bad_w and cfg.engine is None:
        widest = max((b.ffn.intermediate_size or 0) for b in arch.blocks)
        raise TesseraError(f"--ffn-widths {','.join(map(str, bad_w))} does not fit the parent (its widest FFN is "
                           f"{widest}); give widths between 1 and {widest}")
    return layers, excluded, pairs


def _kv_summary(arch: ArchSpec) -> str:
    kvs = sorted({b.attention.num_kv_heads for b in arch.blocks if b.attention.kind == "gqa"})
    return "/".join(map(str, kvs)) or "no"


# ---------------------------------------------------------------------------- calibration statistics
@torch.inference_mode()
def calibrate(parent: Transformer, chunks: torch.Tensor, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per layer: FFN channel contributions mean_t|act_i| * ||W_down[:, i]|| and the least-squares linear FFN, from
    one pass over `chunks` (the activation statistics come from `tessera.importance`)."""
    from tessera.importance import activation_importance

    fits = _LinearFit(parent)
    with fits:  # its hooks accumulate the normal equations during the importance pass, solved layer by layer
        imp = activation_importance(parent, chunks, batch_size=batch_size, seq_agg="mean", batch_agg="mean")
    from tessera.stream.model import tensor

    stats: dict[str, torch.Tensor] = {}
    for i, block in enumerate(parent.model.layers):
        if block.mlp is not None and hasattr(block.mlp, "down_proj"):  # (a streamed parent: read from its shard)
            w_down = tensor(parent, f"model.layers.{i}.mlp.down_proj.weight").detach().float()
            stats[f"ffn_contribution.{i}"] = (imp.neurons[i].float() * w_down.norm(dim=0)).contiguous()
        if i in fits.solved:
            stats[f"linear_ffn.{i}"] = fits.solved.pop(i).contiguous()
        if i in imp.heads:
            stats[f"head_importance.{i}"] = imp.heads[i].float().contiguous()
    return stats


class _LinearFit:
    """Hooks that accumulate Z^T Z and Z^T F (float64) for each FFN (Z its normed input, F its output) and solve
    the least-squares fit of a layer as soon as the pass has moved on to the next one.

    The importance pass is layer by layer (`tessera.stream.run_layers`: every batch through layer i before layer
    i + 1), so only one layer's float64 normal equations exist at a time (2 x hidden^2 x 8 bytes: 268 MB at
    hidden 4096, where keeping every layer's would take 8.6 GB for an 8B parent); the fits kept are float32."""

    def __init__(self, model: Transformer):
        self.model = model
        self.gram: dict[int, torch.Tensor] = {}
        self.cross: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}
        self.solved: dict[int, torch.Tensor] = {}
        self._hooks = []

    def __enter__(self):
        for i, block in enumerate(self.model.model.layers):
            if block.mlp is None:
                continue

            def hook(_m, args, out, i=i):
                z = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                f = out.detach().reshape(-1, out.shape[-1]).double()
                if i not in self.gram:
                    self._solve_pending()  # the pass has left the previous layer for good
                    h = z.shape[1]
                    self.gram[i] = torch.zeros(h, h, dtype=torch.float64)
                    self.cross[i] = torch.zeros(h, f.shape[1], dtype=torch.float64)
                    self.count[i] = 0
                self.gram[i] += z.T @ z
                self.cross[i] += z.T @ f
                self.count[i] += z.shape[0]

            self._hooks.append(block.mlp.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if exc[0] is None:
            self._solve_pending()

    def _solve_pending(self) -> None:
        for i in list(self.gram):
            if i in self.solved:
                raise RuntimeError(f"layer {i}'s FFN ran again after its fit was solved; the pass is not layer by layer")
            self.solved[i] = self.solve(i)
            del self.gram[i], self.cross[i]

    def solve(self, i: int) -> torch.Tensor:
        """W (out x in) minimising sum ||W z - f||^2; a vanishing ridge keeps rank-deficient data solvable."""
        gram, cross = self.gram[i], self.cross[i]
        ridge = 1e-10 * gram.diagonal().mean().clamp(min=1e-30)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        return torch.linalg.solve(gram + ridge * eye, cross).T.float()


# ---------------------------------------------------------------------------- initial weights
def init_variant(parent: Transformer, layer: int, variant: Variant,
                 stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The untrained weights of `variant` in `layer`, named as in the layer's Block (`self_attn.q_proj.weight`, ...).

    Always at native precision: a quantised variant is its native twin, fake-quantised where it is built."""
    arch = parent.arch
    why = _fits(arch, layer, variant.native)
    if why is not None:
        raise TesseraError(f"layer {layer}: variant {variant.key} does not fit the parent: {why}")
    from tessera.stream import layer as materialised

    with materialised(parent, layer) as block:  # a streamed parent's layer is read for this (and let go after)
        return _init_from_block(parent.arch, block, layer, variant, stats)


def _init_from_block(arch: ArchSpec, block: Block, layer: int, variant: Variant,
                     stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    own = {k: v.detach().clone() for k, v in block.state_dict().items()}
    pa, pf = parent_variants(arch, layer)
    v = variant.native
    if v.part == "attention":
        if v == pa:
            return {k: t for k, t in own.items() if k.startswith(("input_layernorm.", "self_attn."))}
        if v.kind == "no_op":
            return {}
        out = {"input_layernorm.weight": own["input_layernorm.weight"]}
        if v.kind == "linear":
            out["self_attn.linear_attn.weight"] = linear_attention_weight(arch, block)
            return out
        from tessera.prune import merge_kv_heads

        kv_from = arch.blocks[layer].attention.num_kv_heads
        heads = stats.get(f"head_importance.{layer}")  # KV-group importance = the sum of its query heads' scores
        names = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
        merged = merge_kv_heads(*(own[n] for n in names), n_heads=arch.num_attention_heads, head_dim=arch.head_dim,
                                target=v.spec.num_kv_heads,
                                group_scores=None if heads is None else heads.view(kv_from, -1).sum(-1))
        out.update(zip(names, merged))  # new tensors (index-selected and concatenated), not views of `own`
        return out
    if v == pf:
        return {k: t for k, t in own.items() if k.startswith(("post_attention_layernorm.", "mlp."))}
    if v.kind == "no_op":
        return {}
    out = {"post_attention_layernorm.weight": own["post_attention_layernorm.weight"]}
    if v.kind == "linear":
        key = f"linear_ffn.{layer}"
        if key not in stats:
            raise TesseraError(f"layer {layer}: the library has no linear-FFN fit; rebuild it with `tessera puzzle library`")
        out["mlp.linear_mlp.weight"] = stats[key].to(own["post_attention_layernorm.weight"].dtype).clone()
        return out
    contribution = stats.get(f"ffn_contribution.{layer}")
    if contribution is None:
        raise TesseraError(f"layer {layer}: the library has no FFN channel contributions; rebuild it")
    keep = torch.topk(contribution, v.spec.intermediate_size).indices.sort().values
    out["mlp.gate_proj.weight"] = own["mlp.gate_proj.weight"][keep]  # indexing by a tensor copies
    out["mlp.up_proj.weight"] = own["mlp.up_proj.weight"][keep]
    out["mlp.down_proj.weight"] = own["mlp.down_proj.weight"][:, keep]
    return out


def linear_attention_weight(arch: ArchSpec, block: Block) -> torch.Tensor:
    """W_o @ W_v with each KV head repeated for the query heads it serves: attention where a token sees only itself."""
    att = block.self_attn
    d = arch.head_dim
    w_v = att.v_proj.weight.detach()  # (kv * d, h)
    rep = att.n_heads // att.n_kv
    w_v = w_v.view(att.n_kv, 1, d, -1).expand(att.n_kv, rep, d, w_v.shape[-1]).reshape(att.n_heads * d, -1)
    return (att.o_proj.weight.detach().double() @ w_v.double()).to(w_v.dtype)


def variant_block(arch: ArchSpec, variant: Variant, state: dict[str, torch.Tensor]) -> Block:
    """A Block holding only `variant` (the other part no_op), with `state` loaded; quantised variants are
    fake-quantised. forward(x, cos, sin, mask, None, 0) returns x + sub_block(norm(x))."""
    if variant.part == "attention":
        spec = BlockSpec(variant.spec, FFNSpec("no_op"))
    else:
        spec = BlockSpec(AttentionSpec("no_op"), variant.spec)
    block = Block(arch, spec)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    block = block.to(dtype)
    missing, unexpected = block.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TesseraError(f"variant {variant.key}: weights do not match its shape (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); the stage directories come from different libraries")
    if variant.precision != "native":
        apply_precision(block, variant.precision)
    return block


def apply_precision(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Quantize every Linear in `module` to `precision` with tessera.quantize (QuantLinears swapped in: `fp8` is
    FP8-dynamic, `nvfp4` the NVFP4 weights), so a variant is scored with the numerics it is exported with."""
    if precision == "native":
        return module
    from tessera.quantize import fake_quantize_weights

    return fake_quantize_weights(module, precision)


# ---------------------------------------------------------------------------- the library on disk
@dataclass
class Library:
    path: Path
    parent_source: str
    parent_fingerprint: str
    arch: ArchSpec
    config: LibraryConfig
    layers: list[LayerVariants]
    excluded: list[Exclusion] = field(default_factory=list)
    pair_exclusions: list[PairExclusion] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    _stats: dict[str, torch.Tensor] | None = None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        if self._stats is None:
            from safetensors.torch import load_file

            file = self.path / "stats.safetensors"
            if not file.is_file():
                raise TesseraError(f"{self.path}: stats.safetensors is missing; rebuild the library")
            self._stats = load_file(str(file))
        return self._stats

    def variants(self, layer: int, part: str | None = None) -> tuple[Variant, ...]:
        lv = self.layers[layer]
        return lv.all if part is None else lv.of(part)

    def check_parent(self, parent: Transformer) -> None:
        from tessera.checkpoint import fingerprint

        got = fingerprint(parent)
        if got != self.parent_fingerprint:
            raise TesseraError(f"{self.path}: library built from a different parent (fingerprint {self.parent_fingerprint}, "
                               f"this parent {got}); rebuild it with `tessera puzzle library PARENT --out DIR`")

    def load_parent(self, parent: Transformer | None = None, device: str = "cpu") -> Transformer:
        """The parent this library was built from (loaded from its recorded source unless given), checked."""
        if parent is None:
            from tessera.checkpoint import load

            parent = load(self.parent_source, device=device)
        self.check_parent(parent)
        return parent

    def to_json(self) -> dict:
        from tessera.formats import to_hf_config

        return {
            "format": LIBRARY_FORMAT, "version": LIBRARY_VERSION,
            "parent": {"source": self.parent_source, "fingerprint": self.parent_fingerprint,
                       "config": to_hf_config(self.arch)},
            "config": asdict(self.config),
            "layers": [{"layer": i, "attention": [v.key for v in lv.attention], "ffn": [v.key for v in lv.ffn]}
                       for i, lv in enumerate(self.layers)],
            "excluded": [asdict(e) for e in self.excluded],
            "pair_exclusions": [asdict(p) for p in self.pair_exclusions],
            **self.meta,
        }

    @staticmethod
    def load(path: str | Path) -> Library:
        path = Path(path).expanduser()
        file = path / "library.json"
        if not file.is_file():
            hint = " (an unfinished build leaves no directory; rerun the library stage)" if path.is_dir() else ""
            raise TesseraError(f"{path}: not a block library (no library.json){hint}; build one with "
                               "`tessera puzzle library PARENT --out DIR`")
        raw = read_json(file, fix="rebuild the library", format=LIBRARY_FORMAT, version=LIBRARY_VERSION,
                        what="a tessera block library")
        from tessera.formats import from_hf_config

        arch = from_hf_config(raw["parent"]["config"], source=str(file))
        cfg = LibraryConfig(**raw["config"])
        layers = [LayerVariants(tuple(Variant.from_key(k) for k in row["attention"]),
                                tuple(Variant.from_key(k) for k in row["ffn"])) for row in raw["layers"]]
        if len(layers) != arch.num_layers:
            raise TesseraError(f"{file}: {len(layers)} layer entries for a {arch.num_layers}-layer parent; rebuild it")
        for i, lv in enumerate(layers):
            for v in lv.all:
                why = _fits(arch, i, v.native)
                if why is not None:
                    raise TesseraError(f"{file}: layer {i} variant {v.key} does not fit the parent's shape ({why}); "
                                       "rebuild the library")
        meta = {k: v for k, v in raw.items() if k not in ("format", "version", "parent", "config", "layers", "excluded",
                                                          "pair_exclusions")}
        return Library(path, raw["parent"]["source"], raw["parent"]["fingerprint"], arch, cfg, layers,
                       [Exclusion(**e) for e in raw.get("excluded", [])],
                       [PairExclusion(**p) for p in raw.get("pair_exclusions", [])], meta)

    def init_state(self, parent: Transformer, layer: int, variant: Variant) -> dict[str, torch.Tensor]:
        return init_variant(parent, layer, variant, self.stats)

    def pairs_excluded(self, layer: int) -> set[tuple[str, str]]:
        return {(p.attention, p.ffn) for p in self.pair_exclusions if p.layer == layer}

    def pair_exclusion_keys(self) -> list[tuple[int, str, str]]:
        """Every (layer, attention key, FFN key) the library rules out: `tessera.puzzle.mip.solve`'s `exclude`."""
        return [(p.layer, p.attention, p.ffn) for p in self.pair_exclusions]


def build_library(parent: Transformer, cfg: LibraryConfig, calib: torch.Tensor, out: str | Path, *,
                  parent_source: str, data_record: dict | None = None, force: bool = False,
                  batch_size: int = 8) -> Library:
    """Offer the variants, calibrate the statistics their initialisation needs, and write the library directory
    (atomically: it appears whole or not at all)."""
    from safetensors.torch import save_file

    from tessera.checkpoint import fingerprint
    from tessera.io import refuse_overwrite

    out = Path(out).expanduser()
    refuse_overwrite(out, force, "library directory")
    if len(calib) == 0:
        raise TesseraError("no calibration data for the library; give more text or a smaller --seq-len")
    t0 = time.perf_counter()
    layers, excluded, pairs = variant_lists(parent.arch, cfg)
    stats = calibrate(parent, calib, batch_size=batch_size)
    lib = Library(out, parent_source, fingerprint(parent), parent.arch, cfg, layers, excluded, pairs,
                  {"calibration": data_record or {"sequences": len(calib), "seq_len": int(calib.shape[1])},
                   "seconds": round(time.perf_counter() - t0, 2)}, stats)
    with atomic_dir(out, force=force) as tmp:
        save_file(stats, str(tmp / "stats.safetensors"))
        (tmp / "library.json").write_text(json.dumps(lib.to_json(), indent=2, sort_keys=True) + "\n")
    return lib


def count(layers: Iterable[LayerVariants]) -> tuple[int, int]:
    layers = list(layers)
    return sum(len(lv.attention) for lv in layers), sum(len(lv.ffn) for lv in layers)
