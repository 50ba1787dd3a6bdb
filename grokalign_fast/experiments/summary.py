"""Time-to-grok statistics: per-method means, speed-ups against a baseline, Welch t-tests.

A run that stops at the step cap without reaching the grokked state is recorded
with ``grokked=False`` and ``None`` for its steps and seconds: it never enters a
mean as a number. A speed-up is given only when every run of both methods
grokked (else it would compare a censored time); the p-values use the grokked
runs, with at least two on each side.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

from .common import mean_std

# Per-run keys summarised: (run key, summary prefix).
TIME_KEYS = (
    ("grok_step", "steps"),
    ("grok_seconds", "seconds"),
    ("grok_cpu_seconds", "cpu_seconds"),
    ("phase_steps", "phase_steps"),
    ("phase_seconds", "phase_seconds"),
)


def welch_p(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Optional[float]:
    """Two-sided Welch t-test p-value of the non-None values; None with fewer than 2 on a side or no variance."""
    from scipy import stats

    a = [float(x) for x in a if x is not None]
    b = [float(x) for x in b if x is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    if max(a) == min(a) and max(b) == min(b):
        return 0.0 if a[0] != b[0] else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarise(runs: List[Dict], methods: Sequence[str], baseline: Optional[str] = "baseline") -> Dict[str, Dict]:
    """Per method: the per-seed values, their mean/std, grokked counts, speed-ups and p-values vs ``baseline``."""
    out: Dict[str, Dict] = {}
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        s: Dict = {
            "n": len(rs),
            "n_grokked": sum(1 for r in rs if r["grokked"]),
            "seeds": [r["seed"] for r in rs],
            "grokked": [bool(r["grokked"]) for r in rs],
            "steps_run": [r["steps_run"] for r in rs],
            "memorised_step": [r.get("mem_step") for r in rs],
            "train_acc_at_end": [r.get("final_train_acc") for r in rs],
            "test_acc_at_end": [r.get("final_test_acc") for r in rs],
        }
        s["all_grokked"] = s["n"] > 0 and s["n_grokked"] == s["n"]
        for key, name in TIME_KEYS:
            vals = [r.get(key) if r["grokked"] else None for r in rs]
            s[name] = vals
            s[name + "_mean"], s[name + "_std"] = mean_std(vals)
        out[m] = s
    if baseline is not None and baseline in out:
        b = out[baseline]
        for m, s in out.items():
            for name in ("steps", "seconds", "cpu_seconds"):
                ok = s["all_grokked"] and b["all_grokked"] and s[name + "_mean"]
                s["speedup_" + name] = (b[name + "_mean"] / s[name + "_mean"]) if ok else None
                s["p_" + name] = welch_p(b[name], s[name]) if m != baseline else None
    return out


def fmt_ms(mean: Optional[float], std: Optional[float], digits: int = 0) -> str:
    if mean is None:
        return "not grokked"
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}x"


def fmt_p(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1e}"


def compare_methods(name: str, args, cfg, t0: float, all_methods: Sequence[str], run_one: Callable,
                    *, title: str, unit: str, plot_title: str) -> Dict:
    """The tail of a grok-or-cap experiment's ``main``: run every method of ``args.methods`` for the
    seeds (default 5, 1 with ``--quick``), summarise against ``baseline``, print the table (``unit``:
    "steps" or "epochs"), write the log CSV and the accuracy curves, and finish."""
    from . import common, plotting

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in all_methods]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {tuple(all_methods)}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    out = common.out_dir(args.out, name)
    runs = common.run_each(name, lambda method, seed: run_one(cfg, method, seed),
                           [(m, s) for m in methods for s in range(seeds)])
    stats = summarise(runs, methods, baseline="baseline" if "baseline" in methods else None)
    rows = [[m, f"{stats[m]['n_grokked']}/{stats[m]['n']}", fmt_ms(stats[m]["steps_mean"], stats[m]["steps_std"]),
             fmt_ms(stats[m]["seconds_mean"], stats[m]["seconds_std"], 2)] for m in methods]
    table = common.print_table(["method", "grokked", f"{unit} to grok", "seconds to grok"], rows, title=title)
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs))
    specs = [dict(title=key, xlabel=unit.rstrip("s"), ylabel=key, series=plotting.method_series(runs, methods, key))
             for key in ("train_acc", "test_acc")]
    png = plotting.panels(os.path.join(out, "curves.png"), specs, title=plot_title)
    return common.finish(name, out, args, cfg, t0, ("log.csv", "curves.png"), seeds=seeds, summary=stats,
                         table=table, plots=[png], runs=[{k: v for k, v in r.items() if k != "log"} for r in runs])
