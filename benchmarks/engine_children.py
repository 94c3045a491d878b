"""The models the engine check and the engine benchmark serve: the default parent, a Minitron-pruned child and a
heterogeneous child per engine, all cut from the parent's own weights (no training: the point is that each engine
computes what tessera computes, not that the children are good).

* parent      SmolLM2-135M-Instruct, 30 layers (plain Llama config)
* minitron    hidden 576 -> 504, FFN 1536 -> 1024, layers 24-27 dropped (magnitude importance; plain Llama config).
              512 is asked; `engine="vllm"` rounds it down to a multiple of the 9 heads, which transformers' and
              so vLLM's LlamaConfig require. head_dim stays 64, so hidden != heads x head_dim (504 vs 576).
* het-vllm    no-op attention in layers 22, 24, 26; one KV head in 3, 7, 11; FFN 1024 / 768 / 512 in 14-16;
              no-op FFN beside real attention in layer 28 (nemotron-nas config)
* het-llamacpp  the same, but layer 28 empty (llama.cpp drops the attention of a layer whose FFN is no-op) and
              layer 20's attention replaced by one linear layer (vLLM has no path for that)
* parent-fp8  the parent quantized by `tessera quantize --scheme fp8-dynamic` (compressed-tensors: FP8 weights per
              output channel, activations FP8 per token at run time); for vLLM only

`python benchmarks/engine_children.py OUT` writes them as checkpoint directories (and GGUF files for llama.cpp).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tessera.arch import AttentionSpec, BlockSpec, FFNSpec

NO_OP_ATTENTION = (22, 24, 26)
ONE_KV_HEAD = (3, 7, 11)
NARROW_FFN = {14: 1024, 15: 768, 16: 512}


def het_blocks(arch, engine: str) -> tuple[BlockSpec, ...]:
    blocks = list(arch.blocks)
    for i in NO_OP_ATTENTION:
        blocks[i] = BlockSpec(AttentionSpec("no_op"), blocks[i].ffn)
    for i in ONE_KV_HEAD:
        blocks[i] = BlockSpec(AttentionSpec("gqa", 1), blocks[i].ffn)
    for i, width in NARROW_FFN.items():
        blocks[i] = BlockSpec(blocks[i].attention, FFNSpec("swiglu", width))
    if engine == "vllm":
        blocks[28] = BlockSpec(blocks[28].attention, FFNSpec("no_op"))
    else:
        blocks[28] = BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op"))
        blocks[20] = BlockSpec(AttentionSpec("linear"), blocks[20].ffn)
    return tuple(blocks)


def heterogeneous_child(parent, engine: str):
    """A child with `het_blocks(engine)`, each layer's variant cut from the parent's layer by Puzzle's
    `init_variant` (KV heads mean-pooled, FFN channels kept by the norm of their down-projection column,
    linear attention as W_o W_v)."""
    import torch

    from tessera.checkpoint import from_state_dict
    from tessera.puzzle.library import Variant, init_variant

    arch = parent.arch.with_blocks(het_blocks(parent.arch, engine))
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith("model.layers.")}
    for i, block in enumerate(arch.blocks):
        mlp = parent.model.layers[i].mlp
        stats = {f"ffn_contribution.{i}": mlp.down_proj.weight.detach().norm(dim=0)} if hasattr(mlp, "down_proj") else {}
        for part, spec in (("attention", block.attention), ("ffn", block.ffn)):
            for name, tensor in init_variant(parent, i, Variant(part, spec), stats).items():
                state[f"model.layers.{i}.{name}"] = tensor
    child = from_state_dict(arch, {k: v.clone() for k, v in state.items()}, source=f"het-{engine}")
    child.tokenizer = parent.tokenizer
    child.provenance = [{"stage": "engine-check child", "engine": engine}]
    with torch.no_grad():
        return child.eval()


def minitron_child(parent):
    from tessera.importance import magnitude_importance
    from tessera.prune import PruneTarget, prune

    return prune(parent, magnitude_importance(parent),
                 PruneTarget(hidden=512, ffn=1024, drop_layers=(24, 25, 26, 27)), engine="vllm")


def fp8_child(parent):
    from tessera.quantize.calibrate import quantize_model

    return quantize_model(parent, "fp8-dynamic")  # dynamic activation scales: no calibration text


VLLM_ONLY = ("het-vllm", "parent-fp8")


def build(out: str | Path, *, gguf_types: tuple[str, ...] = ("f32",),
          names: tuple[str, ...] | None = None) -> dict[str, dict[str, Path]]:
    """Write every model under `out` (reused when already there): {name: {"dir": ..., "f32": gguf, ...}}."""
    import tessera
    from tessera.formats.gguf_export import export_gguf

    out = Path(out)
    parent = tessera.load("default", dtype="fp32")
    makers = {"parent": lambda: parent, "minitron": lambda: minitron_child(parent),
              "het-vllm": lambda: heterogeneous_child(parent, "vllm"),
              "het-llamacpp": lambda: heterogeneous_child(parent, "llamacpp"), "parent-fp8": lambda: fp8_child(parent)}
    paths: dict[str, dict[str, Path]] = {}
    for name, make in makers.items():
        if names is not None and name not in names:
            continue
        directory = out / name
        wanted = [t for t in gguf_types if name not in VLLM_ONLY]
        files = {t: out / f"{name}.{t}.gguf" for t in wanted}
        if not (directory / "config.json").is_file() or not all(f.is_file() for f in files.values()):
            model = make()
            if not (directory / "config.json").is_file():
                tessera.save(model, directory)
            for t, f in files.items():
                if not f.is_file():
                    export_gguf(model, f, t)
        paths[name] = {"dir": directory, **files}
    return paths


if __name__ == "__main__":
    for name, files in build(sys.argv[1] if len(sys.argv) > 1 else "runs/engines").items():
        print(name, *(str(p) for p in files.values()))
