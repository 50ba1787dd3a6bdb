"""Matplotlib (Agg backend, no display) figures for the experiments."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#e377c2", "#17becf"]


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def panels(path: str, specs: Sequence[Dict], *, title: Optional[str] = None, ncols: int = 2) -> str:
    """Save a grid of line plots to ``path`` (PNG).

    Each spec: ``{"title", "xlabel", "ylabel", "series": [{"x", "y", "label", "color", "alpha", "ls"}],
    "logy": bool, "logx": bool, "hline": float | None, "scatter": bool}``. A series with label None
    is left out of the legend (e.g. per-seed lines after the first).
    """
    n = len(specs)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax, spec in zip(axes.flat, specs):
        for s in spec.get("series", []):
            if spec.get("logx"):  # a log axis cannot show step 0
                keep = [i for i, v in enumerate(s["x"]) if v is not None and v > 0]
                s = dict(s, x=[s["x"][i] for i in keep], y=[s["y"][i] for i in keep])
            kw = dict(color=s.get("color"), alpha=s.get("alpha", 1.0), label=s.get("label"))
            if spec.get("scatter") or s.get("scatter"):
                ax.scatter(s["x"], s["y"], s=s.get("size", 8), **kw)
            else:
                ax.plot(s["x"], s["y"], ls=s.get("ls", "-"), lw=s.get("lw", 1.4), **kw)
        if spec.get("hline") is not None:
            ax.axhline(spec["hline"], color="k", ls=":", lw=1)
        if spec.get("diagonal"):
            lo, hi = ax.get_xlim()
            ax.plot([lo, hi], [lo, hi], color="k", ls=":", lw=1)
        series = spec.get("series", [])
        if spec.get("logy") and any(v is not None and v > 0 for s in series for v in s["y"]):
            ax.set_yscale("log")
        if spec.get("logx") and any(v is not None and v > 0 for s in series for v in s["x"]):
            ax.set_xscale("log")
        ax.set_title(spec.get("title", ""), fontsize=10)
        ax.set_xlabel(spec.get("xlabel", ""))
        ax.set_ylabel(spec.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if any(s.get("label") for s in spec.get("series", [])):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_seed_series(runs: List[Dict], key_x: str, key_y: str, label: str, col: str, alpha: float = 0.8, *,
                    source: str = "log"):
    """One line per run (rows in ``run[source]`` with a ``key_y`` value), labelled once."""
    out = []
    for run in runs:
        rows = [r for r in run[source] if r.get(key_y) is not None]
        if not rows:
            continue
        out.append(dict(x=[r[key_x] for r in rows], y=[r[key_y] for r in rows],
                        label=label if not out else None, color=col, alpha=alpha))
    return out


def method_series(runs: List[Dict], methods: Sequence[str], key_y: str, *, key_x: str = "step", alpha: float = 0.8,
                  source: str = "log"):
    """:func:`per_seed_series` of each method's runs (``run["method"]``), one colour per method."""
    out = []
    for i, m in enumerate(methods):
        out += per_seed_series([r for r in runs if r["method"] == m], key_x, key_y, m, color(i), alpha=alpha,
                               source=source)
    return out


def bars(path: str, labels: Sequence[str], values: Sequence[Optional[float]], errors: Sequence[Optional[float]],
         *, ylabel: str, title: str, logy: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 3.6))
    xs = list(range(len(labels)))
    vals = [v if v is not None else 0.0 for v in values]
    errs = [e if e is not None else 0.0 for e in errors]
    ax.bar(xs, vals, yerr=errs, color=[color(i) for i in xs], capsize=3)
    for x, v in zip(xs, values):
        if v is None:
            ax.text(x, 0, "not\ngrokked", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy and any(v is not None and v > 0 for v in values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
