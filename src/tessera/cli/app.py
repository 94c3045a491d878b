"""The typer app, its consoles and the helpers every command group shares.

Every command is wrapped in `friendly`: a `TesseraError` becomes one line (`error: ...`) and exit status 2, never
a traceback. Output that goes to a file or a pipe is not wrapped at 80 columns (paths stay whole).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from tessera.errors import TesseraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tessera: turn a large Llama-family parent into smaller, faster children.")


def _make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    # Without a terminal rich assumes 80 columns and folds long lines; logs and pipes get whole lines instead.
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty else 200)


console = _make_console()
err_console = _make_console(stderr=True)


def friendly(fn):
    """Turn TesseraError into one line and exit 2 instead of a traceback; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TesseraError as exc:
            from rich.markup import escape  # messages name recipe tables like [prune]: not markup

            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def echo_json(payload) -> None:
    """The `--json` output of a command: one JSON document on stdout."""
    typer.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def load_arch(model: str):
    """An ArchSpec from a model name/dir/GGUF; a directory with only config.json needs no weights."""
    from tessera.checkpoint import DEFAULT_NAME, default_parent_dir
    from tessera.formats import read_config

    if model == DEFAULT_NAME:
        return read_config(default_parent_dir())
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return read_config(path)
    if path.suffix == ".gguf" and path.is_file():
        from tessera.checkpoint import load

        return load(path, with_tokenizer=False).arch
    if not path.exists():
        raise TesseraError(f"{path}: no such file or directory; pass 'default', a model directory or a .gguf file")
    raise TesseraError(f"{path}: no config.json here; pass a model directory or a .gguf file")


def warn_engines(arch, what: str = "saved model") -> None:
    """After saving a model: one warning line per serving engine (vLLM, llama.cpp) that cannot serve it, with the
    layer and the reason (`tessera.formats.engines`)."""
    from tessera.formats.engines import incompatibility_lines

    for line in incompatibility_lines(arch):
        err_console.print(f"[yellow]warning:[/] {what}: {line}", highlight=False, soft_wrap=True)


ENGINE_HELP = ("vllm | llamacpp: keep the child servable by this engine (hidden size / FFN widths rounded; refused "
               "otherwise)")


STREAM_HELP = ("auto (stream a parent whose weights exceed a quarter of the free memory) | on (read one layer at a "
               "time from the safetensors shards) | off (load whole)")


DEVICE_HELP = "auto (cuda when visible, else cpu; under torchrun the GPU of LOCAL_RANK) | cpu | cuda | cuda:N"
DTYPE_HELP = "fp32 | bf16 | fp16 (default: fp32 on cpu, bf16 on cuda)"


def load_model(name: str, device: str = "auto", dtype: str | None = None, *, stream: str = "off",
               with_tokenizer: bool = True):
    """A model on `--device` in `--dtype` (the defaults of `tessera.devices`), loaded whole or streamed layer by
    layer (`--stream`, `tessera.stream.load_model`), for the compute commands."""
    from tessera.devices import default_dtype, resolve_device
    from tessera.stream import load_model as stream_or_load

    where = resolve_device(device)
    return stream_or_load(name, stream=stream, device=where, dtype=dtype or default_dtype(where),
                          with_tokenizer=with_tokenizer)


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TesseraError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise TesseraError(f"{what} must be positive integers, got {text!r}")
    return values


def main() -> None:
    import tessera.cli  # noqa: F401 - registers every command group on `app`

    try:
        app()
    except BrokenPipeError:  # `tessera inspect ... | head`
        sys.exit(0)
