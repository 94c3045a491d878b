"""Quantization command: quantize (FP8 / FP8-dynamic / NVFP4 post-training quantization and export)."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.cli.app import DEVICE_HELP, DTYPE_HELP, STREAM_HELP, app, console, echo_json, err_console, friendly, load_model


@app.command()
@friendly
def quantize(model: str = typer.Argument(..., help="'default', a model directory or .gguf (parent or child)"),
             scheme: str = typer.Option(..., "--scheme", help="fp8 | fp8-dynamic | nvfp4 | nvfp4-weight-only"),
             out: Path = typer.Option(..., "--out", help="output checkpoint directory"),
             fmt: str = typer.Option("compressed-tensors", "--format", help="compressed-tensors | modelopt (NVFP4)"),
             calib_samples: int = typer.Option(128, "--calib-samples", min=1, help="calibration sequences"),
             calib_seq_len: int = typer.Option(512, "--calib-seq-len", min=2, help="tokens per calibration sequence"),
             calib_file: Path = typer.Option(None, "--calib-file",
                                             help="text/JSONL to calibrate on (its calibration split; default: the "
                                                  "shared corpus)"),
             observer: str = typer.Option(None, "--observer", help="minmax | mse (default minmax): scale search"),
             gptq: bool = typer.Option(False, "--gptq", help="GPTQ-style error compensation of the weights"),
             ignore: list[str] = typer.Option([], "--ignore",
                                              help="more layers to leave unquantized (name, prefix ending in '.', or "
                                                   "re:regex); repeatable. lm_head and embeddings are always kept"),
             kv_cache: bool = typer.Option(False, "--kv-cache", help="also calibrate FP8 KV-cache scales"),
             weight_strategy: str = typer.Option(None, "--weight-strategy",
                                                 help="FP8 weights per 'tensor' or 'channel' (fp8 default: tensor)"),
             batch_size: int = typer.Option(4, "--batch-size", min=1),
             device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
             stream: str = typer.Option("auto", "--stream", help=STREAM_HELP),
             force: bool = typer.Option(False, "--force", help="overwrite --out"),
             as_json: bool = typer.Option(False, "--json")):
    """Post-training quantization to FP8 (static or dynamic) or NVFP4, calibrated layer by layer on text, written
    as a compressed-tensors (vLLM) or modelopt checkpoint that tessera loads back like any other. A streamed parent
    (--stream) is read, quantized and written one layer at a time, never whole in memory; the output is the same."""
    from rich.progress import Progress

    from tessera.io import refuse_overwrite
    from tessera.quantize import get_scheme
    from tessera.quantize.calibrate import CalibrationConfig, calibration_data, quantize_model
    from tessera.quantize.export import check_format, export, quantize_to_dir
    from tessera.quantize.schemes import resolve_targets
    from tessera.stream import is_streamed

    refuse_overwrite(out, force, "output directory")
    sch = get_scheme(scheme).with_options(ignore=ignore, observer=observer, kv_cache=kv_cache or None,
                                          weight_strategy=weight_strategy)
    check_format(sch.name, fmt)
    cfg = CalibrationConfig(samples=calib_samples, seq_len=calib_seq_len, batch_size=batch_size, observer=observer,
                            gptq=gptq, corpus=str(calib_file) if calib_file else None)
    m = load_model(model, device, dtype, stream=stream)
    stream_on = is_streamed(m)
    data = calibration_data(m.tokenizer, cfg) if (sch.needs_calibration or gptq) else None
    with Progress(console=err_console, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"quantizing to {sch.name}", total=m.arch.num_layers)
        tick = lambda i, n: bar.update(task, completed=i, total=n)  # noqa: E731
        if is_streamed(m):  # calibrated, quantized and written layer by layer
            n_quant = len(resolve_targets(m, sch))
            rec = quantize_to_dir(m, sch, data, out, fmt=fmt, config=cfg, force=force, progress=tick)
        else:
            q = quantize_model(m, sch, data, config=cfg, inplace=True, progress=tick)
            del m
            export(q, out, fmt, force=force)
            rec, n_quant = q.quantization, sum(1 for _ in _quant(q))
    payload = {"out": str(out), "scheme": sch.name, "format": fmt, "observer": rec["observer"], "gptq": gptq,
               "quantized_layers": n_quant, "calibration": rec["calibration"], "seconds": rec["seconds"],
               "streamed": stream_on}
    if as_json:
        echo_json(payload)
        return
    data_txt = (f"{rec['calibration']['chunks']} x {rec['calibration']['seq_len']} tokens of the calibration split"
                if rec["calibration"] else "no calibration (dynamic scales)")
    console.print(f"quantized {payload['quantized_layers']} layers to {sch.name} ({rec['observer']}"
                  f"{', GPTQ' if gptq else ''}; {data_txt}) in {rec['seconds']:.1f} s; wrote {fmt} checkpoint to "
                  f"{out}", highlight=False)


def _quant(model):
    from tessera.quantize import quant_layers

    return quant_layers(model)
