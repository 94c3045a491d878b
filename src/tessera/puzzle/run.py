"""The whole Puzzle search as one library call, stage by stage, resumable: `run_search(parent, cfg, out)`.

Stages and their directories under `out` (the CLI's `tessera puzzle library|bld|score|mip|assemble` run one each,
`tessera search` runs them all):

    library/        the block library (`tessera.puzzle.library`), written atomically
    library/bld/    blockwise local distillation of every variant (`tessera.puzzle.bld`), resumable in place;
                    complete when `bld.json` is there
    scores/         replace-1-block scores (`tessera.puzzle.scoring`), cached per candidate, resumable in place
    mip/            the costs (`costs.json`) and the MIP's choice (`mip.json`), written atomically
    child/          the assembled, globally distilled child with `search.json` (`tessera.puzzle.assemble`),
                    written atomically; its distillation checkpoints live in `child.ckpt/` until it is done

Every stage directory holds `stage.json` (written last): the settings it was made with, the data it used and its
wall time. A directory without it is an interrupted stage: the next stage refuses to read it, and `run_search`
resumes it (BLD and scoring continue from their checkpoints; the atomic stages are redone). A complete stage
whose settings differ from the request is refused with the differences named, unless `force` redoes it and
every stage after it.

Data: one text source dealt into the three disjoint splits of `tessera.data`: library statistics, BLD and global
distillation on `calibration`; the scores (and the held-out KLD during distillation) on `selection`; the final
KLD reported on `reporting`. Records of each are kept and checked for overlap.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.io import atomic_dir, atomic_write_json, read_json
from tessera.puzzle.costs import Target
from tessera.puzzle.library import Library, LibraryConfig
from tessera.puzzle.mip import Constraint

STAGES = ("library", "bld", "score", "mip", "assemble")
STAGE_FILE = "stage.json"
STAGE_FORMAT = "tessera.puzzle.stage"
DIRS = {"library": "library", "score": "scores", "mip": "mip", "assemble": "child"}


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs besides the parent. `costs="measured"` times the variants on the local device
    named by `target.hardware` (cpu | cuda); `"predicted"` uses the cost model of a GPU profile (h100, ...)."""

    constraints: tuple[Constraint, ...] = ()  # the MIP's requirements (at least one for the mip stage)
    target: Target = Target("cpu", "fp32", ("128/128",), 1)
    costs: str = "measured"  # measured | predicted
    library: LibraryConfig = LibraryConfig()
    data: str | None = None  # text / JSONL file; None: the shared corpus
    seq_len: int = 256
    calib_samples: int = 64  # calibration chunks for the library's statistics
    bld_tokens: int = 65_536  # 0: no BLD (variants keep their initialisation)
    bld_batch: int = 8
    bld_lr: float = 1e-4
    score_samples: int = 16  # selection chunks for the replace-1-block scores
    score_tasks: tuple[str, ...] = ()  # "TASK:START-STOP": score on the answers of these items instead (answer_split)
    gkd_tokens: int = 131_072  # 0: no global distillation
    gkd_batch: int = 8
    gkd_lr: float = 1e-4
    gkd_dtype: str | None = None  # GKD autocast: fp32 | bf16 | fp16 (None: the device's default, fp32 on a CPU)
    report_samples: int = 16  # reporting chunks for the final KLD
    measure_reps: int = 3
    num_solutions: int = 1
    refine_rounds: int = 0  # > 0: refine the MIP's choice with its measured in-context costs (tessera.puzzle.refine)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "constraints", tuple(self.constraints))
        object.__setattr__(self, "score_tasks", tuple(self.score_tasks))
        if self.score_tasks:
            from tessera.evaluate.tasks import parse_item_spans

            parse_item_spans(self.score_tasks)
        if self.costs not in ("measured", "predicted"):
            raise TesseraError(f"costs {self.costs!r}: use measured (this machine) or predicted (a GPU profile)")
        for name in ("calib_samples", "score_samples", "report_samples", "bld_batch", "gkd_batch", "measure_reps",
                     "num_solutions"):
            if getattr(self, name) < 1:
                raise TesseraError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.refine_rounds < 0:
            raise TesseraError(f"refine_rounds must be >= 0 (0: the MIP's choice as it is), got {self.refine_rounds}")
        if self.refine_rounds and self.num_solutions > 1:
            raise TesseraError("refinement keeps one child; ask for one solution (--num-solutions 1) with it")
        if self.seq_len < 2 or self.bld_tokens < 0 or self.gkd_tokens < 0:
            raise TesseraError("seq_len must be >= 2 and the BLD / GKD token budgets >= 0")
        if self.gkd_dtype is not None:
            from tessera.devices import format_name

            object.__setattr__(self, "gkd_dtype", format_name(self.gkd_dtype, ("fp32", "bf16", "fp16")))

    def settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's output depends on (a complete stage with other settings is not reused)."""
        common = {"data": self.data, "seq_len": self.seq_len}
        if stage == "library":
            return {**common, "library": asdict(self.library), "calib_samples": self.calib_samples}
        if stage == "bld":
            return {**common, "bld_tokens": self.bld_tokens, "bld_batch": self.bld_batch, "bld_lr": self.bld_lr,
                    "seed": self.seed}
        if stage == "score":
            if self.score_tasks:  # absent otherwise: as recorded before it existed
                return {**common, "score_tasks": list(self.score_tasks)}
            return {**common, "score_samples": self.score_samples}
        if stage == "mip":
            refine = {"refine_rounds": self.refine_rounds} if self.refine_rounds else {}  # absent: as before it existed
            return {"constraints": [asdict(c) for c in self.constraints], "target": self.target.as_dict(),
                    "costs": self.costs, "measure_reps": self.measure_reps, "num_solutions": self.num_solutions,
                    "engine": self.library.engine, **refine}
        if stage == "assemble":
            dtype = {"gkd_dtype": self.gkd_dtype} if self.gkd_dtype else {}  # absent: as recorded before it existed
            return {**common, "gkd_tokens": self.gkd_tokens, "gkd_batch": self.gkd_batch, "gkd_lr": self.gkd_lr,
                    **dtype, "report_samples": self.report_samples, "seed": self.seed}
        raise ValueError(stage)


@dataclass
class SearchResult:
    out: Path
    child: Path
    record: dict  # the child's search.json
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage (0 when reused)
    reused: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- stage records
def read_stage(path: Path, stage: str, *, hint: str = "") -> dict:
    """The `stage.json` of a complete stage directory, or one line saying why it is not one."""
    path = Path(path).expanduser()
    file = path / STAGE_FILE
    if not path.is_dir():
        raise TesseraError(f"{path}: no such {stage} directory; run `tessera puzzle {stage}` first{hint}")
    if not file.is_file():
        raise TesseraError(f"{path}: an interrupted {stage} stage (no {STAGE_FILE}); rerun `tessera puzzle {stage}` "
                           f"on the same input to finish it, or `tessera search` to resume{hint}")
    raw = read_json(file, fix=f"rerun `tessera puzzle {stage}` with --force")
    if raw.get("format") != STAGE_FORMAT or raw.get("stage") != stage:
        raise TesseraError(f"{path}: not a {stage} stage directory (it holds {raw.get('stage')!r}); pass the "
                           f"output of `tessera puzzle {stage}`")
    return raw


def write_stage(path: Path, stage: str, settings: Mapping, seconds: float, **extra) -> dict:
    record = {"format": STAGE_FORMAT, "stage": stage, "settings": dict(settings), "seconds": round(seconds, 2),
              **extra}
    atomic_write_json(Path(path) / STAGE_FILE, record)
    return record


def _differences(saved: Mapping, now: Mapping) -> list[str]:
    saved = json.loads(json.dumps(saved, default=str))
    now = json.loads(json.dumps(now, default=str))
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def _check_reuse(path: Path, stage: str, settings: Mapping, force: bool) -> bool:
    """True when `path` is a complete stage made with `settings` (reuse it); False when it must be (re)made."""
    if not (path / STAGE_FILE).is_file():
        return False
    saved = read_stage(path, stage)
    diffs = _differences(saved.get("settings", {}), settings)
    if not diffs:
        return not force
    if force:
        return False
    raise TesseraError(f"{path}: made with other settings ({'; '.join(diffs)}); pass --force to redo it and the "
                       "stages after it, or choose another --out")


# ---------------------------------------------------------------------------- data
def _split(parent, cfg: SearchConfig, split: str, chunks: int | None = None, tokens: int | None = None):
    from tessera.data import load_split

    max_tokens = tokens if tokens is not None else chunks * cfg.seq_len
    data = load_split(parent.tokenizer, split, cfg.data, seq_len=cfg.seq_len, max_tokens=max_tokens)
    return data.take(chunks) if chunks is not None else data


# ---------------------------------------------------------------------------- the stages
def stage_library(parent, parent_source: str, cfg: SearchConfig, out: str | Path, *, force: bool = False) -> Library:
    """Stage 1: offer the variants and calibrate their initialisation (atomic directory with stage.json)."""
    from tessera.puzzle.library import build_library

    out = Path(out).expanduser()
    t0 = time.perf_counter()
    calib = _split(parent, cfg, "calibration", chunks=cfg.calib_samples)
    library = build_library(parent, cfg.library, calib.chunks, out, parent_source=parent_source,
                            data_record=calib.record(), force=force)
    write_stage(out, "library", cfg.settings("library"), time.perf_counter() - t0,
                parent_fingerprint=library.parent_fingerprint)
    return library


def load_library(path: str | Path, parent=None) -> Library:
    """A complete library directory (refusing an interrupted one and, given `parent`, one of another parent)."""
    path = Path(path).expanduser()
    read_stage(path, "library")
    library = Library.load(path)
    if parent is not None:
        library.check_parent(parent)
    return library


def bld_state(library: Library) -> str:
    """'none' (BLD never ran), 'interrupted' or 'complete'."""
    from tessera.puzzle.bld import bld_dir

    root = bld_dir(library)
    if (root / "bld.json").is_file() and (root / STAGE_FILE).is_file():
        return "complete"
    return "interrupted" if root.exists() else "none"


def stage_bld(library: Library, parent, cfg: SearchConfig, *, force: bool = False, progress: bool = True):
    """Stage 2: blockwise local distillation into `library/bld/` (resumes a killed run); None when bld_tokens = 0."""
    from tessera.puzzle.bld import BLDConfig, bld_dir, run_bld

    if cfg.bld_tokens == 0:
        return None
    t0 = time.perf_counter()
    data = _split(parent, cfg, "calibration", tokens=cfg.bld_tokens)
    bcfg = BLDConfig(tokens=cfg.bld_tokens, batch=cfg.bld_batch, lr=cfg.bld_lr, seed=cfg.seed)
    report = run_bld(library, parent, data, bcfg, force=force, progress=progress)
    write_stage(bld_dir(library), "bld", cfg.settings("bld"), time.perf_counter() - t0, data=data.record())
    return report


def stage_score(library: Library, parent, cfg: SearchConfig, out: str | Path, *, force: bool = False,
                progress: bool = True, split: str = "selection"):
    """Stage 3: replace-1-block scores of every variant on the selection split, or on the answers of the items
    `cfg.score_tasks` names (resumable cache + stage.json)."""
    from tessera.puzzle.scoring import score_library

    out = Path(out).expanduser()
    state = bld_state(library)
    if state == "interrupted":
        raise TesseraError(f"{library.path}/bld: an interrupted BLD run; rerun `tessera puzzle bld {library.path}` "
                           "to finish it before scoring")
    if (out / STAGE_FILE).is_file():
        if not force:
            raise TesseraError(f"{out}: already exists; choose another scores directory or pass --force to rescore")
        (out / STAGE_FILE).unlink()
    elif out.exists() and not (out / "scores.json").is_file() and any(out.iterdir()):
        raise TesseraError(f"{out}: exists and is not a scores directory; choose another --out")
    t0 = time.perf_counter()
    selection = scoring_data(parent, cfg, split)
    table = score_library(library, parent, selection, out, progress=progress, force=force)
    write_stage(out, "score", cfg.settings("score"), time.perf_counter() - t0, library=str(library.path),
                parent_fingerprint=library.parent_fingerprint, bld=state, data=selection.record())
    return table


def scoring_data(parent, cfg: SearchConfig, split: str = "selection"):
    """The tokens the scores are measured on: `cfg.score_samples` chunks of the selection split, or the answers of
    the items `cfg.score_tasks` names (`tessera.evaluate.tasks.answer_split`)."""
    if cfg.score_tasks:
        from tessera.evaluate.tasks import answer_split, parse_item_spans

        return answer_split(parent.tokenizer, parse_item_spans(cfg.score_tasks), cfg.seq_len)
    return _split(parent, cfg, split, chunks=cfg.score_samples)


def scores_data(scores_dir: str | Path, parent):
    """The tokens a complete scores directory was measured on, rebuilt from its settings and checked against its
    record (the same text, split and items, or a clear line why not)."""
    stage = read_stage(Path(scores_dir).expanduser(), "score")
    settings = stage["settings"]
    cfg = SearchConfig(data=settings.get("data"), seq_len=settings.get("seq_len", 256),
                       score_samples=settings.get("score_samples", 16),
                       score_tasks=tuple(settings.get("score_tasks", ())))
    data = scoring_data(parent, cfg)
    if data.record().get("sha256") != stage.get("data", {}).get("sha256"):
        raise TesseraError(f"{scores_dir}: its scoring tokens cannot be rebuilt here (the text or tokenizer "
                           "changed); rescore with `tessera puzzle score --force`")
    return data


def load_scores_stage(path: str | Path, library: Library | None = None):
    """(ScoreTable, Library) of a complete scores directory; its library is loaded unless it is `library` (a second
    score table of the same library)."""
    from tessera.puzzle.scoring import load_scores

    path = Path(path).expanduser()
    stage = read_stage(path, "score")
    if library is None or Path(stage["library"]).expanduser().resolve() != Path(library.path).resolve():
        library = load_library(stage["library"])
    if library.parent_fingerprint != stage.get("parent_fingerprint"):
        raise TesseraError(f"{path}: scored a library of another parent than {library.path} now holds; rescore it")
    table = load_scores(path)
    sha = stage["data"]["sha256"]
    entries = json.loads((path / "scores.json").read_text()).get("entries", [])
    table.kl = {(e["layer"], e["key"]): e["kl"] for e in entries if e["data"] == sha}  # this run's data only
    table.lm_loss = {(e["layer"], e["key"]): e["lm_loss"] for e in entries if e["data"] == sha}
    return table, library


def compute_costs(library: Library, cfg: SearchConfig, progress: Callable[[str], None] | None = None):
    """The cost table of every variant of the library for `cfg.target`: measured here or predicted."""
    from tessera.puzzle.costs import measured_costs, predicted_costs

    variants = {v.key: v for lv in library.layers for v in lv.all}.values()
    if cfg.costs == "predicted":
        return predicted_costs(library.arch, variants, cfg.target)
    return measured_costs(library.arch, variants, cfg.target, reps=cfg.measure_reps, seed=cfg.seed,
                          progress=progress)


def stage_mip(scores_dir: str | Path, cfg: SearchConfig, out: str | Path, *, force: bool = False, costs=None,
              progress: Callable[[str], None] | None = None, parent=None) -> dict:
    """Stage 4: cost the variants and solve the MIP; writes `costs.json` and `mip.json` (atomic). Returns mip.json.
    With `cfg.refine_rounds`, the choice is refined on the scores' own data (`tessera.puzzle.refine`: the children are
    measured against `parent`, or without it the library's recorded parent, checked against its fingerprint) and
    mip.json records every round under "refine"."""
    from tessera.puzzle.assemble import search_record
    from tessera.puzzle.mip import solve

    out = Path(out).expanduser()
    if not cfg.constraints:
        raise TesseraError("the MIP needs a target: --target-speedup S, --max-memory-gb M or --min-throughput T")
    from tessera.io import refuse_overwrite

    refuse_overwrite(out, force, "MIP directory")
    t0 = time.perf_counter()
    table, library = load_scores_stage(scores_dir)
    if cfg.refine_rounds:
        parent = library.load_parent(parent)
    costs = costs or compute_costs(library, cfg, progress)

    def mip(scores, pair_scores=None):
        return solve(scores, costs, cfg.constraints, num_solutions=cfg.num_solutions, engine=cfg.library.engine,
                     exclude=library.pair_exclusion_keys(), pair_scores=pair_scores)

    refined = {}
    if cfg.refine_rounds:
        from tessera.puzzle.refine import child_measure, refine

        data = scores_data(scores_dir, parent)
        best, history = refine(table.kl, lambda s, p: mip(s, p)[0], child_measure(parent, library, [data]),
                               rounds=cfg.refine_rounds)
        solutions = [best]
        refined = {"refine": [r.as_dict() for r in history]}
        if progress:
            progress("refined: measured KL " + " -> ".join(f"{r.measured:.4f}" for r in history))
    else:
        solutions = mip(table.kl)
    records = [search_record(library, table.kl, costs, cfg.constraints, s, extra={"scores_dir": str(scores_dir)})
               for s in solutions]
    result = {**records[0], "alternatives": [{k: r[k] for k in ("chosen", "objective", "predicted")}
                                             for r in records[1:]], **refined}
    with atomic_dir(out, force=force) as tmp:
        (tmp / "costs.json").write_text(costs.to_json())
        (tmp / "mip.json").write_text(json.dumps(result, indent=1, sort_keys=True))
        write_stage(tmp, "mip", cfg.settings("mip"), time.perf_counter() - t0, library=str(library.path),
                    scores=str(scores_dir))
    return result


def load_mip(path: str | Path) -> tuple[dict, Library]:
    path = Path(path).expanduser()
    read_stage(path, "mip")
    record = json.loads((path / "mip.json").read_text())
    return record, load_library(record["library"]["path"])


def stage_assemble(mip_dir: str | Path, parent, cfg: SearchConfig, out: str | Path, *, force: bool = False,
                   fresh: bool = False, progress: bool = True) -> dict:
    """Stage 5: build the chosen child from the trained variants, heal it by global distillation (resumed from
    `out.ckpt` when a killed run left one, unless `fresh`), report its KLD to the parent on the reporting split,
    save it with search.json and stage.json (atomic)."""
    from tessera.data import check_disjoint
    from tessera.devices import default_dtype
    from tessera.evaluate import mean_kld, parent_logits_for
    from tessera.io import refuse_overwrite
    from tessera.puzzle.assemble import assemble, choice_from_record, gkd_config, heal, save_child
    from tessera.puzzle.bld import variant_state

    out = Path(out).expanduser()
    refuse_overwrite(out, force, "child directory")
    t0 = time.perf_counter()
    record, library = load_mip(mip_dir)
    library.check_parent(parent)
    choice = choice_from_record(record)
    child = assemble(parent, library, choice,
                     weights=lambda layer, v: variant_state(library, parent, layer, v))
    reporting = _split(parent, cfg, "reporting", chunks=cfg.report_samples)
    scores_stage = read_stage(Path(record["scores_dir"]), "score")
    records = {"library calibration": library.meta.get("calibration", {}), "scoring": scores_stage.get("data", {}),
               "reporting": reporting.record()}
    check_disjoint({k: r for k, r in records.items() if r})
    ref = parent_logits_for(parent, reporting.chunks)
    report = {"data": records["reporting"], "kld_assembled": mean_kld(parent, child, reporting.chunks,
                                                                      parent_logits=ref).kld}
    gkd = None
    if cfg.gkd_tokens > 0:
        train = _split(parent, cfg, "calibration", tokens=cfg.gkd_tokens + cfg.gkd_batch * cfg.seq_len)
        held = _split(parent, cfg, "selection", chunks=min(4, cfg.score_samples))
        gcfg = gkd_config(cfg.gkd_tokens, seq_len=cfg.seq_len, batch=cfg.gkd_batch, lr=cfg.gkd_lr, seed=cfg.seed,
                          warmup_steps=min(10, max(1, cfg.gkd_tokens // (cfg.gkd_batch * cfg.seq_len) // 10)),
                          eval_every=10**9, ckpt_every=10)
        ckpt = out.with_name(out.name + ".ckpt")
        if fresh and ckpt.exists():
            shutil.rmtree(ckpt)
        resume = (ckpt / "last" / "state.json").is_file()
        t1 = time.perf_counter()
        child, log = heal(parent, child, train, gcfg, heldout=held, ckpt_dir=ckpt, resume=resume, progress=progress,
                          compute_dtype=cfg.gkd_dtype)
        gkd = {"tokens": gcfg.steps * gcfg.tokens_per_step, "steps": gcfg.steps, "loss": gcfg.loss, "lr": gcfg.lr,
               "dtype": cfg.gkd_dtype or default_dtype(parent.device),
               "batch": gcfg.batch, "seq_len": gcfg.seq_len, "final_loss": log[-1]["loss"] if log else None,
               "resumed": resume, "seconds": round(time.perf_counter() - t1, 1), "data": train.record()}
        report["kld"] = mean_kld(parent, child, reporting.chunks, parent_logits=ref).kld
    else:
        report["kld"] = report["kld_assembled"]
    full = {**record, "gkd": gkd, "report": report}
    full.pop("alternatives", None)
    stage = {"format": STAGE_FORMAT, "stage": "assemble", "settings": cfg.settings("assemble"),
             "seconds": round(time.perf_counter() - t0, 2), "mip": str(mip_dir)}
    save_child(child, out, full, force=force, extra_files={STAGE_FILE: stage})
    if cfg.gkd_tokens > 0:
        shutil.rmtree(out.with_name(out.name + ".ckpt"), ignore_errors=True)
    return full


# ---------------------------------------------------------------------------- everything
def run_search(parent, cfg: SearchConfig, out: str | Path, *, parent_source: str | None = None, force: bool = False,
               progress: bool = True, log: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) every stage of the search for `parent` (a Transformer, or a name / path to load) into `out`;
    see the module doc. `force` redoes every stage; without it, complete stages made with the same settings are
    reused, interrupted ones resumed, and complete ones made with other settings refused."""
    from tessera.checkpoint import load

    say = log or (lambda _msg: None)
    out = Path(out).expanduser()
    if not cfg.constraints:
        raise TesseraError("a search needs a target: --target-speedup S, --max-memory-gb M or --min-throughput T")
    if isinstance(parent, (str, Path)):
        parent_source = parent_source or str(parent)
        parent = load(parent)
    if parent_source is None:
        raise TesseraError("run_search needs parent_source (where the parent was loaded from) for the library record")
    if out.exists() and not out.is_dir():
        raise TesseraError(f"{out}: exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: out / d for s, d in DIRS.items()}
    seconds: dict[str, float] = {}
    reused: list[str] = []
    redo = force

    def timed(stage: str, fn):
        t0 = time.perf_counter()
        value = fn()
        seconds[stage] = round(time.perf_counter() - t0, 2)
        say(f"{stage}: {seconds[stage]:.1f} s")
        return value

    # 1. library
    if _check_reuse(paths["library"], "library", cfg.settings("library"), redo):
        library = load_library(paths["library"], parent)
        reused.append("library")
    else:
        redo = redo or paths["library"].exists()
        library = timed("library", lambda: stage_library(parent, parent_source, cfg, paths["library"], force=True))
    # 2. BLD (resumes in place)
    from tessera.puzzle.bld import bld_dir

    state = bld_state(library)
    if cfg.bld_tokens == 0:
        if state != "none":  # trained weights that this request does not want
            shutil.rmtree(bld_dir(library))
            redo = True
    else:
        if state == "complete":
            saved = read_stage(bld_dir(library), "bld")["settings"]
            diffs = _differences(saved, cfg.settings("bld"))
            if diffs and not redo:
                raise TesseraError(f"{bld_dir(library)}: made with other settings ({'; '.join(diffs)}); pass --force "
                                   "to redo it and the stages after it, or choose another --out")
        if state == "complete" and not redo:
            reused.append("bld")
        else:
            if state != "none" and redo:
                shutil.rmtree(bld_dir(library))
            timed("bld", lambda: stage_bld(library, parent, cfg, progress=progress))
            redo = True  # new weights: the scores, the choice and the child are redone
    # 3. scores (a cache keyed by candidate, data and weights: resuming an interrupted run reuses what it scored)
    if _check_reuse(paths["score"], "score", cfg.settings("score"), redo):
        reused.append("score")
    else:
        redo = True
        (paths["score"] / STAGE_FILE).unlink(missing_ok=True)
        timed("score", lambda: stage_score(library, parent, cfg, paths["score"], progress=progress))
    # 4. MIP
    if _check_reuse(paths["mip"], "mip", cfg.settings("mip"), redo):
        reused.append("mip")
    else:
        redo = True
        timed("mip", lambda: stage_mip(paths["score"], cfg, paths["mip"], force=True, progress=say, parent=parent))
    # 5. assemble + GKD
    if _check_reuse(paths["assemble"], "assemble", cfg.settings("assemble"), redo):
        reused.append("assemble")
    else:
        timed("assemble", lambda: stage_assemble(paths["mip"], parent, cfg, paths["assemble"], force=True,
                                                 fresh=redo, progress=progress))
    record = json.loads((paths["assemble"] / "search.json").read_text())
    return SearchResult(out, paths["assemble"], record, seconds, reused)


def constraints_from(target_speedup: float | None = None, max_memory_gb: float | None = None,
                     min_throughput: float | None = None, *, phase: str = "e2e") -> tuple[Constraint, ...]:
    """The CLI's target flags as MIP constraints (any combination; at least one)."""
    out = []
    if target_speedup is not None:
        out.append(Constraint("speedup", target_speedup, phase=phase))
    if max_memory_gb is not None:
        out.append(Constraint("memory", max_memory_gb * 1e9))
    if min_throughput is not None:
        out.append(Constraint("throughput", min_throughput, phase=phase))
    if not out:
        raise TesseraError("give a target: --target-speedup S, --max-memory-gb M or --min-throughput T")
    return tuple(out)


def with_constraints(cfg: SearchConfig, constraints: Sequence[Constraint]) -> SearchConfig:
    return replace(cfg, constraints=tuple(constraints))
