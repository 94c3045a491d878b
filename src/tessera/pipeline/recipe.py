"""Recipes: a TOML file that says which stages turn a parent into a child, validated into frozen dataclasses.

A recipe is one table per stage plus `[recipe]` (name, description, parent, seed) and `[data]` (the corpus and
sequence length every stage shares). The stages present run in the fixed order of `STAGES`; `parent` and
`report` always run. Every mistake is one line naming the table, the key and the fix: an unknown key, a value of
the wrong type, an impossible target (a parameter fraction outside (0, 1), a speed-up <= 1), an unknown task or
GPU, an engine a stage needs that is not installed (see `check_runnable`).

The numbers in a recipe are the `standard` budget. `--budget quick|full` scales only the fields marked with a
`scale` (tokens, samples, task limits) by `BUDGETS`; nothing else (a quick run prunes to the same target, it
only sees less data), so a quick and a full run differ in how well they are trained and measured, not in what.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Stage order; a recipe picks a subset (parent and report always run).
STAGES = ("parent", "prune", "search", "distill", "quantize", "export", "evaluate", "bench", "cost", "report")

# Factors for the fields marked `scale` (metadata): tokens, samples and task limits; None = no limit (whole task).
BUDGETS: dict[str, dict[str, float | None]] = {
    "quick": {"tokens": 0.02, "samples": 0.25, "limit": 0.25},
    "standard": {"tokens": 1.0, "samples": 1.0, "limit": 1.0},
    "full": {"tokens": 10.0, "samples": 4.0, "limit": None},
}

RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes"


def scaled(kind: str, default: Any, **kw) -> Any:
    """A dataclass field that `--budget` scales (`kind`: tokens | samples | limit)."""
    return field(default=default, metadata={"scale": kind, **kw})


@dataclass(frozen=True)
class RecipeInfo:
    name: str = "custom"
    description: str = ""
    parent: str = "default"  # 'default', a model directory or a .gguf file; --parent overrides it
    seed: int = 0


@dataclass(frozen=True)
class DataStage:
    path: str | None = None  # a text/JSONL corpus; default: the shared corpus
    seq_len: int = 256


@dataclass(frozen=True)
class PruneStage:
    """Minitron: activation importance on the calibration split, then width/depth pruning."""

    target_params: float | None = 0.6  # fraction of non-embedding parameters (searches the width/depth split)
    hidden: int | None = None  # or explicit shapes (used when target_params is not given)
    ffn: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    layers: int | None = None
    samples: int = scaled("samples", 64)  # calibration chunks for importance
    drop_samples: int = 4
    select_samples: int = scaled("samples", 8)  # selection-split chunks the width/depth search scores on
    max_candidates: int = 8
    multiple: int = 32
    head_metric: str = "norm"
    layer_metric: str = "bi"


@dataclass(frozen=True)
class SearchStage:
    """Puzzle (`tessera.puzzle.run.run_search`): block library, blockwise local distillation, replace-1-block
    scores, the MIP for a target speed-up on the target GPU (cost model), the assembled child. Global
    distillation is the recipe's [distill] stage (loss kl+cosine is Puzzle's GKD)."""

    target_speedup: float = 1.6  # child throughput / parent throughput on the target, predicted
    gpu: str = "h100"
    dtype: str = "bf16"
    scenarios: tuple[str, ...] = ("128/1024",)
    batch: int = 64
    engine: str = "vllm"  # vllm | llamacpp | transformers: only variants the engine serves
    ffn_fractions: tuple[float, ...] = (0.87, 0.75, 0.5, 0.25, 0.1)
    calib_samples: int = scaled("samples", 64)
    bld_tokens: int = scaled("tokens", 100_000)
    score_samples: int = scaled("samples", 8)
    num_solutions: int = 1
    refine_rounds: int = 0  # > 0: the MIP's choice refined with its measured in-context costs (tessera.puzzle.refine)


@dataclass(frozen=True)
class DistillStage:
    tokens: int = scaled("tokens", 1_000_000)
    batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    temperature: float = 1.0
    loss: str = "kl"  # kl | kl+cosine (Puzzle's GKD)
    eval_every: int = 50
    eval_chunks: int = scaled("samples", 16)
    ckpt_every: int = 10
    teacher_correction: int = 0


@dataclass(frozen=True)
class QuantizeStage:
    """Post-training quantization of the child (`tessera.quantize.calibrate.quantize_model`), written in a format
    serving engines read (`tessera.quantize.export`: compressed-tensors, or modelopt for NVFP4)."""

    scheme: str = "fp8-dynamic"
    format: str = "compressed-tensors"
    calibration_samples: int = scaled("samples", 64)  # only for schemes with static scales


@dataclass(frozen=True)
class ExportStage:
    """A GGUF of the child for llama.cpp (`tessera.formats.gguf_export`), from the last unquantized child (GGUF
    has its own quantization types: `outtype` f32 | f16 | q8_0). A child llama.cpp cannot serve is recorded with
    the reason instead of failing the run."""

    outtype: str = "f16"


@dataclass(frozen=True)
class EvaluateStage:
    tasks: tuple[str, ...] = ("arc_easy", "winogrande")
    limit: int | None = scaled("limit", 400)
    kld_chunks: int = scaled("samples", 32)  # reporting-split chunks for KLD
    perplexity_tokens: int = scaled("samples", 20_000)  # reporting-split tokens for perplexity
    batch_size: int = 16


@dataclass(frozen=True)
class BenchStage:
    """Measured throughput here, child and parent, per IN/OUT scenario."""

    scenarios: tuple[str, ...] = ("128/128", "512/32")
    batch_sizes: tuple[int, ...] = (1,)
    reps: int = 3


@dataclass(frozen=True)
class CostStage:
    """Predicted throughput on a GPU (tessera.cost), child and parent; with `min_tokens_per_s`, the smallest
    deployment (GPUs x dtype) that serves that many output tokens/s in every scenario."""

    gpu: str = "h100"
    dtype: str = "bf16"
    scenarios: tuple[str, ...] = ("128/1024", "2048/128")
    min_tokens_per_s: float | None = None  # sizing target: aggregate output tokens/s per scenario
    dtypes: tuple[str, ...] = ("bf16",)  # sizing: dtypes to consider
    max_gpus: int = 8  # sizing: largest tensor-parallel group considered


@dataclass(frozen=True)
class ReportStage:
    title: str = ""


STAGE_TYPES: dict[str, type] = {"prune": PruneStage, "search": SearchStage, "distill": DistillStage,
                                "quantize": QuantizeStage, "export": ExportStage, "evaluate": EvaluateStage,
                                "bench": BenchStage,
                                "cost": CostStage, "report": ReportStage}
TABLES = {"recipe": RecipeInfo, "data": DataStage, **STAGE_TYPES}


@dataclass(frozen=True)
class Recipe:
    info: RecipeInfo
    data: DataStage
    stages: dict[str, Any]  # stage name -> its config, in STAGES order (parent first, report last)
    source: str = "<recipe>"
    budget: str = "standard"

    @property
    def stage_names(self) -> list[str]:
        return ["parent", *self.stages]

    def config(self, stage: str) -> Any:
        return self.stages.get(stage)

    def as_dict(self) -> dict:
        return {"recipe": dataclasses.asdict(self.info), "data": dataclasses.asdict(self.data),
                **{k: dataclasses.asdict(v) for k, v in self.stages.items()}}

    def stage_hash(self, stage: str) -> str:
        """A hash of what one stage is told to do (its table, the shared data and seed, the parent reference)."""
        cfg = self.stages.get(stage)
        payload = {"stage": stage, "config": dataclasses.asdict(cfg) if cfg is not None else None,
                   "data": dataclasses.asdict(self.data), "seed": self.info.seed}
        if stage == "parent":
            payload["parent"] = self.info.parent
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_budget(self, budget: str) -> Recipe:
        """This recipe with tokens, samples and limits scaled by `BUDGETS[budget]`."""
        if budget not in BUDGETS:
            raise TesseraError(f"--budget {budget!r}: use one of {', '.join(BUDGETS)}")
        factors = BUDGETS[budget]
        stages = {}
        for name, cfg in self.stages.items():
            changes = {}
            for f in dataclasses.fields(cfg):
                kind = f.metadata.get("scale")
                value = getattr(cfg, f.name)
                if kind is None or value is None:
                    continue
                factor = factors[kind]
                changes[f.name] = None if factor is None else max(1, round(value * factor))
            stages[name] = dataclasses.replace(cfg, **changes)
        return dataclasses.replace(self, stages=stages, budget=budget)

    def with_parent(self, parent: str | None) -> Recipe:
        return self if parent is None else dataclasses.replace(self, info=dataclasses.replace(self.info, parent=parent))


# ---------------------------------------------------------------------------- parsing and validation
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_word(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_word(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_word(a) for a in typing.get_args(tp) if a is not type(None))
    return _TYPE_WORDS.get(tp, str(tp))


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except TesseraError:
                pass
        raise TesseraError(f"{where} must be {_type_word(tp)}, got {_toml_type(value)} ({value!r})")
    if origin is tuple:
        if not isinstance(value, list):
            raise TesseraError(f"{where} must be {_type_word(tp)}, got {_toml_type(value)} ({value!r})")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else isinstance(value, tp))
    if not ok:
        raise TesseraError(f"{where} must be {_type_word(tp)}, got {_toml_type(value)} ({value!r})")
    return float(value) if tp is float else value


def _build(cls: type, table: Any, name: str, source: str) -> Any:
    if not isinstance(table, dict):
        raise TesseraError(f"{source}: [{name}] must be a table, got {_toml_type(table)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in known:
            raise TesseraError(f"{source}: unknown key '{key}' in [{name}]; known keys: {', '.join(known)}")
        kwargs[key] = _coerce(value, hints[key], f"{source}: [{name}] {key}")
    return cls(**kwargs)


def _check(recipe: Recipe) -> None:
    """Values that parse but cannot be met: one line each."""
    src = recipe.source
    d = recipe.data
    if d.seq_len < 2:
        raise TesseraError(f"{src}: [data] seq_len must be >= 2, got {d.seq_len}")
    for name, cfg in recipe.stages.items():
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise TesseraError(f"{src}: [{name}] {f.name} must not be negative, got {v}")
            if f.metadata.get("scale") and v is not None and v < 1:
                raise TesseraError(f"{src}: [{name}] {f.name} must be >= 1, got {v}")
    p = recipe.config("prune")
    if p is not None:
        explicit = [p.hidden, p.ffn, p.heads, p.kv_heads, p.layers]
        if p.target_params is not None and not 0 < p.target_params < 1:
            raise TesseraError(f"{src}: [prune] target_params {p.target_params} is impossible: it is a fraction of "
                               "the parent's non-embedding parameters and must be between 0 and 1 (e.g. 0.6)")
        if p.target_params is None and all(v is None for v in explicit):
            raise TesseraError(f"{src}: [prune] says neither target_params nor any of hidden, ffn, heads, kv_heads, "
                               "layers; give a target")
        from tessera.importance import HEAD_METRICS

        if p.head_metric not in HEAD_METRICS:
            raise TesseraError(f"{src}: [prune] head_metric {p.head_metric!r}: use {' or '.join(HEAD_METRICS)}")
        from tessera.prune import LAYER_METRICS

        if p.layer_metric not in LAYER_METRICS:
            raise TesseraError(f"{src}: [prune] layer_metric {p.layer_metric!r}: use {' or '.join(LAYER_METRICS)}")
    if "prune" in recipe.stages and "search" in recipe.stages:
        raise TesseraError(f"{src}: [prune] and [search] both make the child; keep one of them")
    s = recipe.config("search")
    if s is not None:
        if s.target_speedup <= 1:
            raise TesseraError(f"{src}: [search] target_speedup {s.target_speedup} is impossible: a child must be "
                               "faster than its parent (> 1, e.g. 1.6)")
        _check_gpu(s.gpu, src, "search")
        _check_scenarios(s.scenarios, src, "search")
        from tessera.formats.engines import ENGINES

        if s.engine not in ENGINES:
            raise TesseraError(f"{src}: [search] engine {s.engine!r}: use one of {', '.join(ENGINES)}")
        if not s.ffn_fractions or any(not 0 < f <= 1 for f in s.ffn_fractions):
            raise TesseraError(f"{src}: [search] ffn_fractions must be fractions in (0, 1], e.g. [0.75, 0.5]")
    dcfg = recipe.config("distill")
    if dcfg is not None:
        from tessera.distill import LOSSES

        if dcfg.loss not in LOSSES:
            raise TesseraError(f"{src}: [distill] loss {dcfg.loss!r}: use {' or '.join(LOSSES)}")
        if dcfg.batch < 1 or dcfg.grad_accum < 1 or dcfg.lr <= 0 or dcfg.temperature <= 0:
            raise TesseraError(f"{src}: [distill] batch and grad_accum must be >= 1, lr and temperature positive")
        if "prune" not in recipe.stages and "search" not in recipe.stages:
            raise TesseraError(f"{src}: [distill] needs a child to train; add a [prune] or [search] stage")
    x = recipe.config("export")
    if x is not None and x.outtype not in ("f32", "f16", "q8_0"):
        raise TesseraError(f"{src}: [export] outtype {x.outtype!r}: use f32, f16 or q8_0")
    e = recipe.config("evaluate")
    if e is not None:
        from tessera.evaluate.tasks import get_task

        if not e.tasks:
            raise TesseraError(f"{src}: [evaluate] tasks is empty; name at least one task, e.g. [\"arc_easy\"]")
        for t in e.tasks:
            try:
                get_task(t)
            except TesseraError as exc:
                raise TesseraError(f"{src}: [evaluate] tasks: {exc}") from None
    b = recipe.config("bench")
    if b is not None:
        _check_scenarios(b.scenarios, src, "bench")
        if not b.batch_sizes or min(b.batch_sizes) < 1 or b.reps < 1:
            raise TesseraError(f"{src}: [bench] batch_sizes and reps must be >= 1")
    c = recipe.config("cost")
    if c is not None:
        from tessera.cost import DTYPE_BYTES

        _check_gpu(c.gpu, src, "cost")
        _check_scenarios(c.scenarios, src, "cost")
        for dt in (c.dtype, *c.dtypes):
            if dt not in DTYPE_BYTES:
                raise TesseraError(f"{src}: [cost] dtype {dt!r}: use one of {', '.join(DTYPE_BYTES)}")
        if c.max_gpus < 1:
            raise TesseraError(f"{src}: [cost] max_gpus must be >= 1, got {c.max_gpus}")
        if c.min_tokens_per_s is not None and c.min_tokens_per_s <= 0:
            raise TesseraError(f"{src}: [cost] min_tokens_per_s must be positive, got {c.min_tokens_per_s}")


def _check_gpu(name: str, src: str, table: str) -> None:
    from tessera.hardware import GPUS

    if name not in GPUS and name != "cpu":
        raise TesseraError(f"{src}: [{table}] gpu {name!r} is unknown; use one of {', '.join([*GPUS, 'cpu'])}")


def _check_scenarios(scenarios: tuple[str, ...], src: str, table: str) -> None:
    from tessera.cost import Scenario

    if not scenarios:
        raise TesseraError(f"{src}: [{table}] scenarios is empty; give at least one IN/OUT pair, e.g. [\"128/128\"]")
    for s in scenarios:
        try:
            Scenario.parse(s)
        except TesseraError as exc:
            raise TesseraError(f"{src}: [{table}] scenarios: {exc}") from None


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """A validated `Recipe` from TOML text (the standard budget)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TesseraError(f"{source}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in TABLES:
            raise TesseraError(f"{source}: unknown table [{key}]; known tables: {', '.join(TABLES)}")
    info = _build(RecipeInfo, raw.get("recipe", {}), "recipe", source)
    data = _build(DataStage, raw.get("data", {}), "data", source)
    stages = {name: _build(STAGE_TYPES[name], raw[name], name, source) for name in STAGES if name in raw}
    stages.setdefault("report", ReportStage())
    recipe = Recipe(info, data, stages, source)
    _check(recipe)
    return recipe


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"))}


def load_recipe(name_or_path: str | Path | None = None) -> Recipe:
    """A recipe file, or the name of a shipped one (`default`, `minitron`, ...); None is `default`."""
    name_or_path = name_or_path or "default"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        if str(name_or_path) in shipped:
            path = shipped[str(name_or_path)]
        elif path.suffix == ".toml" or "/" in str(name_or_path):
            raise TesseraError(f"{path}: no such recipe file; pass a .toml file or one of {', '.join(shipped)}")
        else:
            raise TesseraError(f"recipe {name_or_path!r} is not shipped; use one of {', '.join(shipped)} or a .toml file")
    return parse_recipe(path.read_text(encoding="utf-8"), str(path))


# Library modules a stage needs beyond what every install has; a stage whose module is missing cannot run.
STAGE_MODULES = {"search": ("tessera.puzzle.run", "run_search"), "export": ("tessera.formats.gguf_export", "export_gguf"),
                 "quantize": ("tessera.quantize.calibrate", "quantize_model")}


def check_runnable(recipe: Recipe) -> None:
    """One line when a stage of `recipe` needs a library this install does not have yet."""
    import importlib

    for stage, (module, attr) in STAGE_MODULES.items():
        if stage not in recipe.stages:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = None
        if mod is None or not hasattr(mod, attr):
            raise TesseraError(f"{recipe.source}: stage [{stage}] needs {module}.{attr}, which this install does not "
                               f"have yet; run a recipe without [{stage}] (e.g. minitron)")
