"""Serving-engine commands: export (a GGUF file that llama.cpp runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.cli.app import app, console, echo_json, fmt_bytes, friendly, load_model
from tessera.errors import TesseraError


@app.command()
@friendly
def export(model: str = typer.Argument(..., help="'default', a model directory or .gguf"),
           fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp)"),
           outtype: str = typer.Option("f32", "--outtype", help="f32 | f16 | q8_0"),
           out: Path = typer.Option(..., "--out", help="output file"),
           pre_tokenizer: str = typer.Option(None, "--pre-tokenizer",
                                             help="llama.cpp's pre-tokenizer name, when it is not recognised"),
           force: bool = typer.Option(False, "--force", help="overwrite OUT"),
           as_json: bool = typer.Option(False, "--json")):
    """Write a GGUF that llama.cpp runs: `llama` for a homogeneous model, `deci` for a heterogeneous one, with the
    full tokenizer. Refuses a model llama.cpp cannot serve, naming the layer and the reason."""
    from tessera.formats.gguf_export import export_gguf
    from tessera.io import refuse_overwrite

    if fmt != "gguf":
        raise TesseraError(f"--format {fmt!r}: only gguf is supported (vLLM serves the checkpoint directory itself)")
    refuse_overwrite(out, force, "output file")
    m = load_model(model, "cpu", "fp32")
    result = export_gguf(m, out, outtype, pre_tokenizer=pre_tokenizer)
    summary = {"out": str(result.path), "architecture": result.architecture, "outtype": result.outtype,
               "tensors": result.tensors, "bytes": result.nbytes, "pre_tokenizer": result.pre_tokenizer,
               "vocab_size": result.vocab_size, "f16_fallbacks": list(result.f16_fallbacks)}
    if as_json:
        echo_json(summary)
        return
    console.print(f"wrote {out}: {result.architecture} architecture, {result.tensors} tensors, {fmt_bytes(result.nbytes)} "
                  f"({outtype}), vocab {result.vocab_size}, pre-tokenizer {result.pre_tokenizer}", highlight=False)
    if result.f16_fallbacks:
        console.print(f"warning: {len(result.f16_fallbacks)} matrices (e.g. {result.f16_fallbacks[0]}) are stored f16, "
                      "not q8_0: their rows are not a multiple of 32, and llama.cpp runs f16 slower than q8_0 on a "
                      "CPU; prune to hidden / FFN widths that are multiples of 32", highlight=False)
