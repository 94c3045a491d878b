"""Plots (matplotlib, PNG): the efficient frontier and a child's per-layer architecture."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from tessera.arch import ArchSpec  # noqa: E402
from tessera.io import atomic_path  # noqa: E402


def _save(fig, out: Path) -> Path:
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated in (throughput up, quality up), sorted by throughput."""
    front = [p for p in points
             if not any(q["throughput"] >= p["throughput"] and q["quality"] >= p["quality"]
                        and (q["throughput"] > p["throughput"] or q["quality"] > p["quality"]) for q in points)]
    return sorted(front, key=lambda p: p["throughput"])


def plot_frontier(points: list[dict], out: Path, *, quality_label: str = "accuracy preserved (%)",
                  throughput_label: str = "throughput (tokens/s)", title: str = "efficient frontier") -> Path:
    """points: [{"name", "throughput", "quality", "kind": "parent"|"child"|"baseline"}]."""
    style = {"parent": ("*", "black", 180), "child": ("o", "tab:green", 60), "baseline": ("s", "tab:gray", 50)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, (marker, color, size) in style.items():
        pts = [p for p in points if p.get("kind", "child") == kind]
        if pts:
            ax.scatter([p["throughput"] for p in pts], [p["quality"] for p in pts], marker=marker, c=color, s=size,
                       label=kind, zorder=3)
    front = pareto_front(points)
    ax.plot([p["throughput"] for p in front], [p["quality"] for p in front], "--", c="tab:green", alpha=0.6,
            label="frontier", zorder=2)
    for p in points:
        ax.annotate(p["name"], (p["throughput"], p["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(throughput_label)
    ax.set_ylabel(quality_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_architecture(arch: ArchSpec, out: Path, *, parent: ArchSpec | None = None, title: str = "") -> Path:
    """Per-layer KV heads (top) and FFN width (bottom); no-op sub-blocks marked x, linear ones marked L."""
    layers = range(arch.num_layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, arch.num_layers * 0.25), 5), sharex=True)
    kv = [arch.kv_heads(i) for i in layers]
    width = [arch.blocks[i].ffn.intermediate_size or 0 for i in layers]
    top.bar(layers, kv, color="tab:blue")
    bottom.bar(layers, width, color="tab:orange")
    if parent is not None:
        top.axhline(parent.kv_heads(0), ls="--", c="gray", lw=1, label="parent")
        bottom.axhline(parent.blocks[0].ffn.intermediate_size or 0, ls="--", c="gray", lw=1, label="parent")
        top.legend(fontsize=7)
    for i in layers:
        for ax, kind in ((top, arch.blocks[i].attention.kind), (bottom, arch.blocks[i].ffn.kind)):
            if kind == "no_op":
                ax.text(i, 0, "x", ha="center", va="bottom", color="red", fontsize=9, fontweight="bold")
            elif kind == "linear":
                ax.text(i, 0, "L", ha="center", va="bottom", color="purple", fontsize=9, fontweight="bold")
    top.set_ylabel("KV heads")
    bottom.set_ylabel("FFN width")
    bottom.set_xlabel("layer  (x = no-op, L = linear)")
    top.set_title(title or f"{arch.num_layers} layers, {arch.num_params() / 1e6:.1f} M parameters")
    return _save(fig, out)


def plot_score_heatmap(rows: list[list[float | None]], columns: list[str], out: Path, *,
                       title: str = "replace-1-block KL (nats)", log: bool = True) -> Path:
    """Layers (rows) x variants (columns) heat map of scores, e.g. Puzzle's replace-1-block KL; blank where a layer
    does not offer a variant. `log` colours by log10 (scores span orders of magnitude; exact zeros get the floor)."""
    import numpy as np

    data = np.array([[np.nan if x is None else float(x) for x in row] for row in rows], dtype=float).reshape(
        len(rows), len(columns))
    shown = data.copy()
    label = "KL"
    if log:
        positive = data[np.isfinite(data) & (data > 0)]
        floor = positive.min() / 10 if positive.size else 1e-6
        shown = np.log10(np.where(np.isfinite(data), np.maximum(data, floor), np.nan))
        label = "log10 KL"
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(columns) + 2), max(3, 0.25 * len(rows) + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis_r", interpolation="nearest")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([str(i) for i in range(len(rows))], fontsize=7)
    ax.set_xlabel("variant")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, out)
