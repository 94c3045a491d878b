"""`run_recipe`: the stages of a recipe over one run directory, resumable after a kill.

Each stage is a function `(ctx) -> summary dict` that reads its inputs (the parent, earlier stages' outputs),
calls the library (`tessera.prune`, `tessera.distill`, `tessera.evaluate`, `tessera.bench`, `tessera.cost`) and
writes `RUN_DIR/<stage>/` atomically. Before a stage runs, its inputs are hashed (its recipe table, the shared
data settings, the content hashes of the outputs it reads); the stage is skipped when the manifest says it is
done with the same input hashes and its outputs are in place, and rerun otherwise (`--from-stage S` and
`--force` rerun regardless). Distillation checkpoints into `RUN_DIR/distill.ckpt/` and a killed distillation
resumes from its last checkpoint, bit for bit (`tessera.distill`); pruning keeps its importance scores in
`RUN_DIR/prune.ckpt/`; Puzzle's search works in `RUN_DIR/search.work/` and resumes there (`tessera.puzzle.run`).

Failures that are the user's to fix come out as one `TesseraError` line: a missing parent, an output directory
that cannot be written, a full disk (the stage is marked failed, every completed stage stays, `--resume` continues),
a target that cannot be met.

Test hook: `TESSERA_PIPELINE_KILL_AT=STAGE:POINT` SIGKILLs this process at a named point of a stage (`start`,
`written` = outputs in place but the manifest not yet updated), or `STAGE:+SECONDS` that long after the stage
starts; the kill-and-resume tests use it to stop a run at chosen and at random points.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.io import atomic_dir, atomic_write_json, clean_stale
from tessera.pipeline.manifest import Manifest, RunLock, hash_path, now, peak_memory_bytes
from tessera.pipeline.recipe import STAGES, Recipe, check_runnable

MODEL_STAGES = ("prune", "search", "distill", "quantize")  # stages whose output is a child model
WORK_DIRS = {"prune": "prune.ckpt", "search": "search.work", "distill": "distill.ckpt"}  # what a killed stage resumes from
KILL_ENV = "TESSERA_PIPELINE_KILL_AT"
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    manifest: Manifest
    device: str = "auto"
    progress: bool = True
    echo: Callable[[str], None] = print
    _parent: Any = None
    _cache: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.recipe.info.seed

    def parent(self):
        """The parent model (loaded once per process, fp32 on the run's device)."""
        if self._parent is None:
            from tessera.checkpoint import load

            self._parent = load(self.recipe.info.parent, dtype="fp32", device=self.device)
        return self._parent

    def child_stage(self, before: str) -> str | None:
        """The last model-producing stage of the recipe before `before` (None: the child is the parent)."""
        order = self.recipe.stage_names
        found = None
        for s in order[:order.index(before)]:
            if s in MODEL_STAGES:
                found = s
        return found

    def child_dir(self, before: str) -> Path | None:
        stage = self.child_stage(before)
        return self.run_dir / stage if stage else None

    def load_child(self, before: str):
        from tessera.checkpoint import load

        where = self.child_dir(before)
        if where is None:
            return self.parent()
        return load(where, dtype="fp32", device=self.device)

    def data_path(self) -> str | None:
        return self.recipe.data.path


# ---------------------------------------------------------------------------- fault injection (tests)
def _fault(stage: str, point: str) -> None:
    spec = os.environ.get(KILL_ENV, "")
    if spec and spec == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _arm_timer(stage: str) -> threading.Timer | None:
    spec = os.environ.get(KILL_ENV, "")
    name, _, when = spec.partition(":+")
    if name != stage or not when:
        return None
    timer = threading.Timer(float(when), lambda: os.kill(os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
    return timer


# ---------------------------------------------------------------------------- stages
def _write_json_stage(ctx: Context, stage: str, payload: dict, extra: dict[str, str] | None = None) -> None:
    with atomic_dir(ctx.run_dir / stage, force=True) as tmp:
        (tmp / "result.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def read_stage(run_dir: Path, stage: str) -> dict | None:
    path = Path(run_dir) / stage / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


ARCH_ONLY_STAGES = ("parent", "cost", "report")  # stages that need the parent's config, not its weights


def parent_arch(ctx: Context):
    """The parent's architecture; read from its config.json alone when no stage needs its weights (so a
    config-only directory, e.g. benchmarks/configs/llama-3.1-70b, can be sized for a GPU)."""
    if any(s not in ARCH_ONLY_STAGES for s in ctx.recipe.stage_names):
        return ctx.parent().arch
    path = _parent_files(ctx.recipe.info.parent)
    if path.is_dir():
        from tessera.formats import read_config

        return read_config(path)
    return ctx.parent().arch


def stage_parent(ctx: Context) -> dict:
    from tessera.formats import config_json

    arch = parent_arch(ctx)
    if ctx._parent is not None:
        from tessera.checkpoint import fingerprint

        fp = fingerprint(ctx._parent)
    else:
        fp = "files:" + ctx._cache["parent_hash"]
    payload = {"reference": ctx.recipe.info.parent, "fingerprint": fp, "params": arch.num_params(),
               "non_embedding_params": arch.non_embedding_params(), "layers": arch.layer_rows(),
               "kv_bytes_per_token_bf16": arch.kv_cache_bytes_per_token(2), "weights_loaded": ctx._parent is not None}
    _write_json_stage(ctx, "parent", payload, {"config.json": config_json(arch)})
    return {"tokens": 0, "summary": {"fingerprint": fp, "params": payload["params"]}}


def stage_prune(ctx: Context) -> dict:
    from tessera.checkpoint import save
    from tessera.data import load_split
    from tessera.importance import Importance, activation_importance
    from tessera.prune import PruneTarget, prune, search_target

    cfg = ctx.recipe.config("prune")
    seq_len = ctx.recipe.data.seq_len
    m = ctx.parent()
    work = ctx.run_dir / "prune.ckpt"
    scores = work / "importance.safetensors"
    imp = None
    if scores.is_file() and (work / "inputs.json").is_file() and \
            json.loads((work / "inputs.json").read_text()) == ctx._cache["inputs"]:
        imp = Importance.load(scores)  # a killed prune resumes after its importance scores
    if imp is None:
        shutil.rmtree(work, ignore_errors=True)
        calib = load_split(m.tokenizer, "calibration", ctx.data_path(), seq_len=seq_len,
                           max_tokens=cfg.samples * seq_len).take(cfg.samples)
        imp = activation_importance(m, calib, with_drop_loss=True, drop_samples=cfg.drop_samples)
        work.mkdir(parents=True, exist_ok=True)
        imp.save(scores)
        atomic_write_json(work / "inputs.json", ctx._cache["inputs"])
    _fault("prune", "importance")
    imp.check(m)
    search = None
    tokens = cfg.samples * seq_len
    if cfg.target_params is not None:
        selection = load_split(m.tokenizer, "selection", ctx.data_path(), seq_len=seq_len,
                               max_tokens=cfg.select_samples * seq_len).take(cfg.select_samples)
        search = search_target(m, imp, cfg.target_params, selection, max_candidates=cfg.max_candidates,
                               multiple=cfg.multiple)
        target = search.target
        tokens += selection.tokens * len(search.candidates)
    else:
        target = PruneTarget(hidden=cfg.hidden, ffn=cfg.ffn, heads=cfg.heads, kv_heads=cfg.kv_heads, layers=cfg.layers,
                             layer_metric=cfg.layer_metric, head_metric=cfg.head_metric)
    child = prune(m, imp, target, check=False)
    if search is not None:
        child.provenance[-1]["search"] = search.as_dict()
    save(child, ctx.run_dir / "prune", force=True,
         extra_files={"prune.json": {"target": target.describe(), "search": search.as_dict() if search else None}})
    return {"tokens": tokens, "summary": {"target": target.describe(), "params": child.arch.num_params()}}


def stage_search(ctx: Context) -> dict:
    """Puzzle's search into RUN_DIR/search.work (resumable in place: BLD and scoring continue from their
    checkpoints), then the assembled child copied whole to RUN_DIR/search."""
    from tessera.cost import Scenario
    from tessera.puzzle.costs import Target
    from tessera.puzzle.library import LibraryConfig
    from tessera.puzzle.run import SearchConfig, constraints_from, run_search

    cfg = ctx.recipe.config("search")
    work = ctx.run_dir / "search.work"
    marker = work / "pipeline-inputs.json"
    if work.exists() and not (marker.is_file() and json.loads(marker.read_text()) == ctx._cache["inputs"]):
        shutil.rmtree(work)  # made for other inputs: start over
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, ctx._cache["inputs"])
    scfg = SearchConfig(
        constraints=constraints_from(target_speedup=cfg.target_speedup),
        target=Target(cfg.gpu, cfg.dtype, tuple(Scenario.parse(x) for x in cfg.scenarios), cfg.batch),
        costs="predicted", library=LibraryConfig(ffn_fractions=cfg.ffn_fractions, engine=cfg.engine),
        data=ctx.data_path(), seq_len=ctx.recipe.data.seq_len, calib_samples=cfg.calib_samples,
        bld_tokens=cfg.bld_tokens, score_samples=cfg.score_samples, gkd_tokens=0,
        num_solutions=cfg.num_solutions, refine_rounds=cfg.refine_rounds, seed=ctx.seed)
    result = run_search(ctx.parent(), scfg, work, parent_source=ctx.recipe.info.parent, progress=ctx.progress,
                        log=lambda line: ctx.echo(f"  search {line}"))
    with atomic_dir(ctx.run_dir / "search", force=True) as tmp:
        for f in result.child.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    seq = ctx.recipe.data.seq_len
    return {"tokens": cfg.bld_tokens + (cfg.calib_samples + cfg.score_samples) * seq,
            "summary": {"stage_seconds": result.seconds, "reused": result.reused,
                        "predicted": result.record.get("predicted")}}


def stage_distill(ctx: Context) -> dict:
    from tessera.checkpoint import save
    from tessera.data import load_split
    from tessera.distill import DistillConfig, distill

    cfg = ctx.recipe.config("distill")
    seq_len = ctx.recipe.data.seq_len
    teacher = ctx.parent()
    student = ctx.load_child("distill")
    dcfg = DistillConfig(tokens=cfg.tokens, seq_len=seq_len, batch=cfg.batch, grad_accum=cfg.grad_accum, lr=cfg.lr,
                         warmup_steps=cfg.warmup, temperature=cfg.temperature, loss=cfg.loss,
                         eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every, seed=ctx.seed,
                         teacher_correction_steps=cfg.teacher_correction)
    dcfg.validate()
    ckpt = ctx.run_dir / "distill.ckpt"
    marker = ckpt / "inputs.json"
    resume = (ckpt / "last" / "state.json").is_file() and marker.is_file() and \
        json.loads(marker.read_text()) == ctx._cache["inputs"]
    resumed_from = json.loads((ckpt / "last" / "state.json").read_text())["step"] if resume else None
    if not resume:
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
        atomic_write_json(marker, ctx._cache["inputs"])
    train = load_split(teacher.tokenizer, "calibration", ctx.data_path(), seq_len=seq_len,
                       max_tokens=max(dcfg.tokens, dcfg.tokens_per_step), min_chunks=dcfg.batch)
    heldout = load_split(teacher.tokenizer, "selection", ctx.data_path(), seq_len=seq_len,
                         max_tokens=cfg.eval_chunks * seq_len).take(cfg.eval_chunks)
    student, log = distill(teacher, student, train, dcfg, heldout=heldout, ckpt_dir=ckpt, resume=resume,
                           progress=ctx.progress)
    save(student, ctx.run_dir / "distill", force=True, extra_files={"distill_log.json": log})
    last = log[-1] if log else {}
    return {"tokens": dcfg.steps * dcfg.tokens_per_step, "resumed_from": resumed_from,
            "summary": {"steps": dcfg.steps, "final_loss": last.get("loss"), "heldout_kld": last.get("heldout_kld")}}


def stage_quantize(ctx: Context) -> dict:
    from tessera.data import load_split
    from tessera.quantize import get_scheme
    from tessera.quantize.calibrate import quantize_model
    from tessera.quantize.export import check_format, export

    cfg = ctx.recipe.config("quantize")
    scheme = get_scheme(cfg.scheme)
    check_format(scheme.name, cfg.format)
    child = ctx.load_child("quantize")
    seq_len = ctx.recipe.data.seq_len
    calib = None
    if scheme.needs_calibration:
        calib = load_split(child.tokenizer, "calibration", ctx.data_path(), seq_len=seq_len,
                           max_tokens=cfg.calibration_samples * seq_len).take(cfg.calibration_samples)
    q = quantize_model(child, scheme, calib, inplace=True)
    export(q, ctx.run_dir / "quantize", cfg.format, force=True)
    return {"tokens": calib.tokens if calib is not None else 0,
            "summary": {"scheme": scheme.name, "format": cfg.format}}


def stage_export(ctx: Context) -> dict:
    """RUN_DIR/export/child.gguf for llama.cpp, or the reason llama.cpp cannot serve this child."""
    from tessera.checkpoint import load
    from tessera.formats.engines import incompatibilities
    from tessera.formats.gguf_export import export_gguf

    cfg = ctx.recipe.config("export")
    source = None
    order = ctx.recipe.stage_names
    for s in order[:order.index("export")]:
        if s in MODEL_STAGES and s != "quantize":
            source = s
    model = load(ctx.run_dir / source, dtype="fp32") if source else ctx.parent()
    problems = [str(i) for i in incompatibilities(model.arch, "llamacpp")]
    with atomic_dir(ctx.run_dir / "export", force=True) as tmp:
        payload = {"source": source or "parent", "outtype": cfg.outtype, "gguf": None, "llamacpp_problems": problems}
        if not problems:
            try:
                result = export_gguf(model, tmp / "child.gguf", cfg.outtype, name=ctx.recipe.info.name)
                payload.update(gguf="child.gguf", architecture=result.architecture, bytes=result.nbytes,
                               pre_tokenizer=result.pre_tokenizer)
            except TesseraError as exc:  # e.g. a tokenizer GGUF cannot carry: the run goes on, the report says why
                payload["llamacpp_problems"] = [f"no GGUF: {exc}"]
        (tmp / "result.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return {"tokens": 0, "summary": {"gguf": payload["gguf"], "llamacpp_problems": len(problems)}}


def stage_evaluate(ctx: Context) -> dict:
    from tessera.data import load_split
    from tessera.evaluate import evaluate_tasks, mean_kld
    from tessera.evaluate.perplexity import perplexity_of_ids
    from tessera.evaluate.table import accuracy_preserved

    cfg = ctx.recipe.config("evaluate")
    seq_len = ctx.recipe.data.seq_len
    parent = ctx.parent()
    child = ctx.load_child("evaluate")
    tasks = list(cfg.tasks)
    p_res = evaluate_tasks(parent, tasks, limit=cfg.limit, batch_size=cfg.batch_size, progress=ctx.progress,
                           log_samples=True)
    c_res = evaluate_tasks(child, tasks, limit=cfg.limit, batch_size=cfg.batch_size, progress=ctx.progress,
                           log_samples=True)
    preserved = accuracy_preserved(c_res, p_res)  # with child - parent paired on each item
    for r in (*p_res.values(), *c_res.values()):  # wall time and cache hits differ between runs; numbers do not
        r.pop("seconds", None)
        r.pop("cached", None)
        r.pop("samples", None)
    kld_data = load_split(parent.tokenizer, "reporting", ctx.data_path(), seq_len=seq_len,
                          max_tokens=cfg.kld_chunks * seq_len).take(cfg.kld_chunks)
    kld = mean_kld(parent, child, kld_data.chunks)
    ppl_data = load_split(parent.tokenizer, "reporting", ctx.data_path(), seq_len=None, max_tokens=cfg.perplexity_tokens)
    ids = ppl_data.chunks[0].tolist()
    window = min(1024, parent.arch.max_position_embeddings)
    ppl = {name: perplexity_of_ids(m, ids, window).as_dict() for name, m in (("parent", parent), ("child", child))}
    payload = {"tasks": tasks, "limit": cfg.limit, "parent": p_res, "child": c_res,
               "preserved": preserved, "kld": kld.as_dict(), "perplexity": ppl,
               "data": {"kld": kld_data.record(), "perplexity": ppl_data.record()}}
    _write_json_stage(ctx, "evaluate", payload)
    n_items = sum(r.get("n", 0) for r in c_res.values())
    avg = payload["preserved"]["average"]
    return {"tokens": kld_data.tokens * 2 + len(ids) * 2,
            "summary": {"items": n_items, "preserved": avg["preserved"] if avg else None, "kld": kld.kld,
                        "child_perplexity": ppl["child"]["perplexity"]}}


def stage_bench(ctx: Context) -> dict:
    from tessera.bench import bench
    from tessera.cost import Scenario

    cfg = ctx.recipe.config("bench")
    scenarios = [Scenario.parse(s) for s in cfg.scenarios]
    out = {}
    for name, model in (("parent", ctx.parent()), ("child", ctx.load_child("bench"))):
        out[name] = [r.as_dict() for r in bench(model, scenarios, list(cfg.batch_sizes), reps=cfg.reps, seed=ctx.seed)]
    speedups = {f"{p['scenario']} b{p['batch']}": c["e2e_tok_s"] / p["e2e_tok_s"]
                for p, c in zip(out["parent"], out["child"])}
    import torch

    payload = {**out, "speedup": speedups, "threads": torch.get_num_threads(), "device": out["child"][0]["device"]}
    _write_json_stage(ctx, "bench", payload)
    tokens = sum(s.input_len + s.output_len for s in scenarios) * sum(cfg.batch_sizes) * (cfg.reps + 1) * 2
    return {"tokens": tokens, "summary": {"speedup": speedups}}


def size_deployment(arch, cfg) -> dict:
    """The fewest GPUs (then the highest throughput) among dtypes x TP sizes 1..max_gpus that serve
    `min_tokens_per_s` output tokens/s in every scenario; one line with the best found when none does."""
    from tessera.cost import Scenario, predict
    from tessera.hardware import get_hardware

    hw = get_hardware(cfg.gpu)
    options, best = [], None
    for dtype in cfg.dtypes:
        for tp in range(1, cfg.max_gpus + 1):  # TP sizes the cost model refuses (heads not divisible) are skipped
            per = {}
            for s in cfg.scenarios:
                try:
                    p = predict(arch, hw, Scenario.parse(s), dtype=dtype, tp=tp)
                except TesseraError:
                    per = None
                    break
                per[s] = p.output_tokens_per_s * tp
            if per is not None:
                worst = min(per.values())
                option = {"dtype": dtype, "gpus": tp, "tokens_per_s": per, "worst_tokens_per_s": worst,
                          "meets": worst >= cfg.min_tokens_per_s}
                options.append(option)
                if best is None or worst > best["worst_tokens_per_s"]:
                    best = option
    meeting = [o for o in options if o["meets"]]
    if not meeting:
        if best is None:
            raise TesseraError(f"the child does not fit on up to {cfg.max_gpus} {cfg.gpu} in any of "
                               f"{', '.join(cfg.dtypes)}; raise max_gpus or use a smaller child")
        raise TesseraError(f"min_tokens_per_s {cfg.min_tokens_per_s:,.0f} cannot be met on up to {cfg.max_gpus} "
                           f"{cfg.gpu}: the best is {best['worst_tokens_per_s']:,.0f} output tokens/s "
                           f"({best['gpus']} GPUs, {best['dtype']}); lower min_tokens_per_s or raise max_gpus")
    chosen = min(meeting, key=lambda o: (o["gpus"], -o["worst_tokens_per_s"]))
    return {"chosen": chosen, "options": options, "target_tokens_per_s": cfg.min_tokens_per_s}


def _predict_fitting(arch, hw, scenario: str, cfg) -> dict:
    """The prediction on the fewest GPUs (powers of two up to max_gpus) the model fits on."""
    from tessera.cost import Scenario, predict

    tp, last = 1, None
    while tp <= cfg.max_gpus:
        try:
            return predict(arch, hw, Scenario.parse(scenario), dtype=cfg.dtype, tp=tp).as_dict()
        except TesseraError as exc:
            last = exc
        tp *= 2
    raise TesseraError(str(last)) from None


def stage_cost(ctx: Context) -> dict:
    from tessera.hardware import get_hardware

    cfg = ctx.recipe.config("cost")
    hw = get_hardware(cfg.gpu)
    p_arch = parent_arch(ctx)
    child_dir = ctx.child_dir("cost")
    if child_dir is not None:
        from tessera.formats import read_config

        child_arch = read_config(child_dir)
    else:
        child_arch = p_arch
    pred = {name: {s: _predict_fitting(arch, hw, s, cfg) for s in cfg.scenarios}
            for name, arch in (("parent", p_arch), ("child", child_arch))}
    speedup = {s: pred["child"][s]["output_tokens_per_s"] / pred["parent"][s]["output_tokens_per_s"]
               for s in cfg.scenarios}
    payload = {"gpu": cfg.gpu, "dtype": cfg.dtype, "predicted": pred, "speedup": speedup}
    if cfg.min_tokens_per_s is not None:
        payload["sizing"] = size_deployment(child_arch, cfg)
    _write_json_stage(ctx, "cost", payload)
    summary = {"speedup": speedup}
    if "sizing" in payload:
        summary["deployment"] = {k: payload["sizing"]["chosen"][k] for k in ("gpus", "dtype", "worst_tokens_per_s")}
    return {"tokens": 0, "summary": summary}


def stage_report(ctx: Context) -> dict:
    from tessera.pipeline.report import build_report

    paths = build_report(ctx.run_dir, manifest=ctx.manifest)
    return {"tokens": 0, "summary": {k: str(v.relative_to(ctx.run_dir)) for k, v in paths.items()}}


STAGE_FUNCS: dict[str, Callable[[Context], dict]] = {
    "parent": stage_parent, "prune": stage_prune, "search": stage_search, "distill": stage_distill,
    "quantize": stage_quantize, "export": stage_export, "evaluate": stage_evaluate, "bench": stage_bench, "cost": stage_cost,
    "report": stage_report,
}


# ---------------------------------------------------------------------------- inputs and decisions
def _parent_files(reference: str) -> Path:
    from tessera.checkpoint import DEFAULT_NAME, default_parent_dir

    if reference == DEFAULT_NAME:
        return default_parent_dir()
    path = Path(reference).expanduser()
    if not path.exists():
        raise TesseraError(f"parent {reference}: no such file or directory; pass --parent default, a model directory "
                           "or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise TesseraError(f"parent {reference}: no config.json in this directory; pass a model directory or a .gguf file")
    return path


def stage_inputs(ctx: Context, stage: str) -> dict[str, str]:
    """What `stage` depends on, by content hash: its recipe table and the outputs of the stages it reads."""
    m = ctx.manifest
    inputs = {"config": ctx.recipe.stage_hash(stage)}
    if stage == "parent":
        inputs["parent_files"] = ctx._cache.setdefault("parent_hash", hash_path(_parent_files(ctx.recipe.info.parent)))
        return inputs
    reads = ["parent"]
    if stage == "export":  # the last unquantized child
        order = ctx.recipe.stage_names
        reads += [s for s in order[:order.index("export")] if s in MODEL_STAGES and s != "quantize"][-1:]
        for s in reads:
            inputs[s] = m.stage(s).outputs.get("hash", "missing")
        return inputs
    if stage == "report":
        reads = [s for s in ctx.recipe.stage_names if s != "report"]
    else:
        child = ctx.child_stage(stage)
        if child:
            reads.append(child)
    for s in reads:
        inputs[s] = m.stage(s).outputs.get("hash", "missing")
    return inputs


def _check_writable(run_dir: Path) -> None:
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise TesseraError(f"{run_dir}: cannot create the run directory ({probe} is a file); pass --out a directory path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        test = run_dir / f".write-test-{os.getpid()}"
        test.write_bytes(b"x")
        test.unlink()
    except OSError as exc:
        if exc.errno in SPACE_ERRNOS:
            raise TesseraError(f"{run_dir}: no space left on this device; free some space or pass --out on "
                               "another disk") from None
        raise TesseraError(f"{run_dir}: cannot write the run directory ({exc.strerror}); pass --out a writable "
                           "directory") from None


def _fmt_oserror(exc: OSError, stage: str, run_dir: Path) -> str:
    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno in SPACE_ERRNOS:
        return (f"stage {stage}: no space left on the device{where}; free space under {run_dir} and re-run with "
                "--resume (finished stages are kept)")
    return f"stage {stage}: {exc.strerror or exc}{where}; fix it and re-run with --resume (finished stages are kept)"


# ---------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    child: Path | None
    report: Path | None
    manifest: Manifest

    def as_dict(self) -> dict:
        stages = {k: {"status": v.status, "wall_s": v.wall_s, "tokens": v.tokens, "peak_memory_bytes":
                      v.peak_memory_bytes, "resumed_from": v.resumed_from, **v.outputs.get("summary", {})}
                  for k, v in self.manifest.stages.items()}
        return {"run_dir": str(self.run_dir), "ran": self.ran, "skipped": self.skipped,
                "child": str(self.child) if self.child else None, "report": str(self.report) if self.report else None,
                "stages": stages}


def run_recipe(recipe: Recipe, run_dir: str | os.PathLike, *, resume: bool = False, force: bool = False,
               from_stage: str | None = None, device: str = "auto", progress: bool = True,
               echo: Callable[[str], None] = print) -> RunResult:
    """Run (or continue) `recipe` in `run_dir`; see the module docstring."""
    check_runnable(recipe)
    run_dir = Path(run_dir).expanduser()
    names = recipe.stage_names
    if from_stage is not None and from_stage not in names:
        known = [s for s in STAGES if s in names]
        raise TesseraError(f"--from-stage {from_stage!r} is not a stage of this recipe; use one of {', '.join(known)}")
    _parent_files(recipe.info.parent)  # a missing parent is refused before any work
    if run_dir.exists() and not (run_dir / "manifest.json").is_file() and not force and \
            any(p.name != ".lock" for p in run_dir.iterdir()):
        raise TesseraError(f"{run_dir}: exists and is not a tessera run directory; pass another --out or --force")
    _check_writable(run_dir)
    with RunLock(run_dir):
        if (run_dir / "manifest.json").is_file() and not (resume or force or from_stage):
            done = ", ".join(Manifest.load(run_dir).done()) or "none"
            raise TesseraError(f"{run_dir}: holds a run (stages done: {done}); pass --resume to continue it, "
                               "--from-stage S to redo from S, or --force to start over")
        manifest = Manifest.load(run_dir)
        manifest.recipe = recipe.as_dict()
        manifest.meta = {"budget": recipe.budget, "source": recipe.source, "parent": recipe.info.parent,
                         "device": device, "stages": names}
        for stale in [s for s in manifest.stages if s not in names]:
            del manifest.stages[stale]
        ctx = Context(recipe, run_dir, manifest, device=device, progress=progress, echo=echo)
        redo_from = 0 if force else names.index(from_stage) if from_stage else None
        ran, skipped = [], []
        for i, stage in enumerate(names):
            clean_stale(run_dir / stage)
            inputs = stage_inputs(ctx, stage)
            rec = manifest.stage(stage)
            forced = redo_from is not None and i >= redo_from
            if not forced and rec.status == "done" and rec.inputs == inputs and (run_dir / stage).is_dir():
                skipped.append(stage)
                echo(f"{stage}: done ({rec.wall_s:.1f} s), skipped")
                continue
            if forced and stage in WORK_DIRS:
                shutil.rmtree(run_dir / WORK_DIRS[stage], ignore_errors=True)
            _run_stage(ctx, stage, inputs)
            ran.append(stage)
        child_stage = ctx.child_stage("report")
        child = run_dir / child_stage if child_stage else None
        report = run_dir / "report" / "report.html" if "report" in names else None
        manifest.meta["child"] = child_stage
        manifest.save()
        return RunResult(run_dir, ran, skipped, child, report, manifest)


def _run_stage(ctx: Context, stage: str, inputs: dict[str, str]) -> None:
    rec = ctx.manifest.stage(stage)
    timer = None
    try:
        rec.status, rec.inputs, rec.error = "running", inputs, None
        rec.started, rec.attempts = now(), rec.attempts + 1
        rec.outputs = {}
        ctx._cache["inputs"] = inputs
        ctx.manifest.save()
        ctx.echo(f"{stage}: running")
        _fault(stage, "start")
        timer = _arm_timer(stage)
        t0 = time.perf_counter()
        result = STAGE_FUNCS[stage](ctx)
        if timer is not None:
            timer.cancel()
        _fault(stage, "written")
        rec.wall_s = round(time.perf_counter() - t0, 3)
        rec.tokens = result.get("tokens")
        rec.resumed_from = result.get("resumed_from")
        rec.peak_memory_bytes = peak_memory_bytes()
        rec.outputs = {"path": stage, "hash": hash_path(ctx.run_dir / stage), "summary": result.get("summary", {})}
        rec.status, rec.finished = "done", now()
        ctx.manifest.save()
    except OSError as exc:
        _fail(ctx, rec, _fmt_oserror(exc, stage, ctx.run_dir))
        raise TesseraError(rec.error) from None
    except TesseraError as exc:
        _fail(ctx, rec, f"stage {stage}: {exc}")
        raise TesseraError(rec.error) from None
    finally:
        if timer is not None:
            timer.cancel()
    ctx.echo(f"{stage}: done in {rec.wall_s:.1f} s")


def _fail(ctx: Context, rec, message: str) -> None:
    rec.status, rec.error, rec.finished = "failed", message, now()
    try:
        ctx.manifest.save()
    except OSError:  # a full disk may refuse the manifest too; the previous one stays whole (atomic write)
        pass


def config_summary(recipe: Recipe) -> dict:
    return {name: dataclasses.asdict(cfg) for name, cfg in recipe.stages.items()}
