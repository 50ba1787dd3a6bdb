"""grok-digits: accelerating Omnigrok-style grokking with GrokAlign (the paper's Table 1, on the digits).

Setup (PAPER.md, last section): scikit-learn's 8x8 digits, inputs / 16, 1000 training
samples (a fixed random split), the other 797 for test; MLP 64-200-200-10, ReLU, no
bias, every weight x8 at init; AdamW lr 1e-3, weight decay 0.01, batch 200; MSE on
one-hot targets (``--loss ce`` for cross-entropy); float32. With real MNIST IDX files
in ``--data-dir`` the MLP is 784-200-200-10 on 1000 MNIST training images.

"Grokked" = test accuracy >= ``--threshold`` (0.89 on the digits: 0.9 of the 98.9%
the same net reaches with a normal init; 0.85 on MNIST, the paper's criterion),
checked every ``--eval-every`` steps. A run stops there, or at ``--max-steps``; a
capped run is reported as not grokked, never as a number. "Memorised" = training
accuracy 100%; the grokking phase is the gap from memorised to grokked (0 when a
run groks before it memorises). Seconds count the training steps only (forward,
penalty, backward, filter, optimiser), not the evaluations or the monitor, which
are the same for every method; both wall (``seconds``) and per-process CPU
(``cpu_seconds``) time are reported.

Methods: ``baseline`` (weight decay only); ``grokalign`` (the library's GrokAlign;
defaults chosen on the digits, see ``DEFAULT_GROKALIGN``); ``grokalign-paper`` (the
paper's lambda 1e-4 MSE / 1e-3 CE, authors' estimator, opt-in: it is as slow as the
baseline); ``grokfast`` (EMA alpha 0.8, lambda 0.1); ``noise`` ("adversarial"
training, Gaussian input noise sigma = max(0.06 (1 - train acc), 0.03), with the
training accuracy of the last evaluation); ``grokalign+grokfast``; and, opt-in, ``orthograd``
(AdamW wrapped in :class:`grokalign_fast.optim.OrthoGrad`: each gradient without its component
along its weight) and ``grokalign-offset`` (the authors' newer penalty, ``offset=`` the GrokAlign
weight, forward estimator: ``J x`` rides the dual stream). The digits model has no biases and ReLU
activations, so ``f(x) = J x`` and the offset is 0; ``grokalign-offset`` therefore trains the same
MLP with biases, where it is not.

Seeds: ``--seeds`` (default 5); ``--method-seeds`` lowers it for some methods. The
default (``DEMO_METHOD_SEEDS``: baseline 3, grokfast 2, noise 3, grokalign+grokfast 3,
grokalign 5) makes the default run (``make demo``) fit 10 minutes on 2 cores: the
~40k-step baseline and Grokfast cost most of it. ``--method-seeds none`` gives every
method ``--seeds`` seeds (the full study). Runs go to
``--jobs`` worker processes (default 2), one thread each. The data split is fixed
(``split_seed`` 0); the seed sets the init, the batch order and the probes.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import common, data, plotting, summary, train
from .. import models
from ..monitor import GrokMonitor
from ..optim import OrthoGrad
from ..regularizer import GrokAlign

NAME = "grok-digits"
HELP = "Omnigrok grokking on the digits: baseline vs GrokAlign, Grokfast, noise, GrokAlign+Grokfast (the main job)"

DEFAULT_METHODS = ("baseline", "grokalign", "grokfast", "noise", "grokalign+grokfast")
ALL_METHODS = DEFAULT_METHODS + ("grokalign-paper", "orthograd", "grokalign-offset")
# Methods measured to need the baseline's ~40k steps on the digits (run first, for packing).
SLOW_METHODS = ("baseline", "grokfast", "grokalign-paper")
# Seeds per method in the default run (`make demo`), so that it fits 10 minutes on 2 cores:
# the ~40k-step baseline and Grokfast cost 90% of the time. Methods not listed get --seeds.
DEMO_METHOD_SEEDS = "baseline=3,grokfast=2,noise=3,grokalign+grokfast=3,grokalign-paper=2"

# GrokAlign on the digits (chosen by sweeps, see docs/experiments.md): the squared norm
# (Hoffman et al.) with lambda 5e-3, computed lazily every 4th step (weight x4 then, so
# the expected penalty per step is unchanged) on a random quarter of the batch
# (subsample=0.25, unbiased), one output-space probe. Against every=4 on the whole batch:
# ~7% more steps (4040 vs 3760 over 5 seeds) and ~12% fewer seconds (10.5 vs 11.9 s).
# The paper's lambda 1e-4 (unsquared) gives 1.2-1.3x fewer steps here and is slower in seconds.
DEFAULT_GROKALIGN = dict(weight=5e-3, squared=True, every=4, estimator="reverse", num_probes=1, subsample=0.25)
PAPER_LAMBDA = {"mse": 1e-4, "ce": 1e-3}


@dataclass
class Config:
    n_train: int = 1000
    hidden: tuple = (200, 200)
    init_scale: float = 8.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch: int = 200
    loss: str = "mse"
    threshold: Optional[float] = None  # None: 0.89 digits, 0.85 MNIST
    max_steps: int = 60000
    eval_every: int = 100
    monitor_every: int = 500
    monitor_probe: int = 32
    ga_weight: float = DEFAULT_GROKALIGN["weight"]
    ga_squared: bool = DEFAULT_GROKALIGN["squared"]
    ga_every: int = DEFAULT_GROKALIGN["every"]
    ga_estimator: str = DEFAULT_GROKALIGN["estimator"]
    ga_probes: int = DEFAULT_GROKALIGN["num_probes"]
    ga_subsample: Optional[float] = DEFAULT_GROKALIGN["subsample"]
    ga_backend: str = "auto"
    grokfast_alpha: float = 0.8
    grokfast_lamb: float = 0.1
    noise_scale: float = 0.06
    noise_floor: float = 0.03
    data_dir: Optional[str] = None
    split_seed: int = 0
    dtype: str = "float32"


def load_split(cfg: Config) -> data.Split:
    if cfg.data_dir and data.mnist_available(cfg.data_dir):
        return data.mnist(cfg.data_dir, cfg.n_train, split_seed=cfg.split_seed)
    return data.digits(cfg.n_train, split_seed=cfg.split_seed)


def threshold_for(cfg: Config, split: data.Split) -> float:
    if cfg.threshold is not None:
        return cfg.threshold
    return 0.85 if split.name == "mnist" else 0.89


def grokalign_kwargs(cfg: Config, method: str) -> Optional[Dict]:
    if method == "grokalign-paper":
        return dict(weight=PAPER_LAMBDA[cfg.loss], squared=False, every=1, estimator="reverse", num_probes=1,
                    backend=cfg.ga_backend)
    if method.startswith("grokalign"):
        kw = dict(weight=cfg.ga_weight, squared=cfg.ga_squared, every=cfg.ga_every,
                  estimator=cfg.ga_estimator, num_probes=cfg.ga_probes, backend=cfg.ga_backend,
                  subsample=cfg.ga_subsample)
        if method == "grokalign-offset":
            kw.update(offset=cfg.ga_weight, estimator="forward")
        return kw
    return None


def run_one(cfg: Config, method: str, seed: int, *, split: Optional[data.Split] = None,
            progress: bool = False) -> Dict:
    """Train one (method, seed) until grokked or ``cfg.max_steps``; returns the run record with its logs."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    t_start, c_start = time.perf_counter(), time.thread_time()
    split = split if split is not None else load_split(cfg)
    dtype = getattr(torch, cfg.dtype)
    xtr, ytr = split.x_train.to(dtype), split.y_train
    xte, yte = split.x_test.to(dtype), split.y_test
    C = split.num_classes
    threshold = threshold_for(cfg, split)

    gen = common.seed_everything(seed)
    model = models.mlp((xtr.shape[1],) + tuple(cfg.hidden) + (C,), init_scale=cfg.init_scale, dtype=dtype,
                       bias=method == "grokalign-offset")
    if method == "orthograd":
        opt = OrthoGrad(model.parameters(), torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    ga_kw = grokalign_kwargs(cfg, method)
    reg = GrokAlign(model, generator=torch.Generator().manual_seed(10_000 + seed), **ga_kw) if ga_kw else None
    gf = common.Grokfast(model, cfg.grokfast_alpha, cfg.grokfast_lamb) if "grokfast" in method else None
    noise = train.InputNoise(cfg.noise_scale, cfg.noise_floor, gen) if method == "noise" else None
    monitor = GrokMonitor(model, xtr[: cfg.monitor_probe], every=cfg.monitor_every, max_probe=cfg.monitor_probe)

    def evaluate(run: train.Run) -> Dict:
        return dict(train_acc=common.accuracy(model, xtr, ytr), test_acc=common.accuracy(model, xte, yte),
                    loss=run.loss, penalty=run.penalty if reg is not None else None,
                    grokalign_norm=run.penalty_norm if reg is not None else None,
                    weight_norm=common.weight_norm(model), sigma=noise.sigma if noise is not None else None,
                    seconds=run.seconds, cpu_seconds=run.cpu_seconds)

    if cfg.loss == "mse":
        target, loss = F.one_hot(ytr, C).to(dtype), F.mse_loss
    else:
        target, loss = ytr, F.cross_entropy
    run = train.train(model, opt, xtr, target, loss, steps=cfg.max_steps, eval_every=cfg.eval_every,
                      evaluate=evaluate, batches=train.shuffled_batches(len(xtr), cfg.batch, gen), regularizer=reg,
                      grokfast=gf, noise=noise, stop=lambda row: row["test_acc"] >= threshold, log_start=False,
                      monitor=monitor, monitor_every=cfg.monitor_every, monitor_extra=("train_acc", "test_acc"),
                      progress=f"{method} s{seed}" if progress else None)
    log = run.log
    mem = train.first_row(log, "train_acc", 1.0)
    mem_step, mem_seconds = (mem["step"], mem["seconds"]) if mem is not None else (None, None)
    grokked = run.stopped
    grok_step, grok_seconds, grok_cpu = (run.step, run.seconds, run.cpu_seconds) if grokked else (None, None, None)
    if grokked:
        phase_steps = max(0, grok_step - mem_step) if mem_step is not None else 0
        phase_seconds = max(0.0, grok_seconds - mem_seconds) if mem_step is not None else 0.0
    else:
        phase_steps = phase_seconds = None
    return dict(
        method=method, seed=seed, grokked=grokked, grok_step=grok_step, grok_seconds=grok_seconds,
        grok_cpu_seconds=grok_cpu, mem_step=mem_step, mem_seconds=mem_seconds,
        memorised_before_grok=(mem_step is not None and grokked and mem_step <= grok_step),
        phase_steps=phase_steps, phase_seconds=phase_seconds, steps_run=run.step,
        capped=not grokked, threshold=threshold, data=split.name,
        final_train_acc=log[-1]["train_acc"] if log else None,
        final_test_acc=log[-1]["test_acc"] if log else None,
        train_seconds=run.seconds, train_cpu_seconds=run.cpu_seconds, run_seconds=time.perf_counter() - t_start,
        run_cpu_seconds=time.thread_time() - c_start,
        monitor_seconds=monitor.total_seconds, log=log, monitor=monitor.history,
    )


def _worker(payload):
    cfg, method, seed = payload
    common.setup_torch(1)
    return run_one(cfg, method, seed)


def parse_method_seeds(text: str) -> Dict[str, int]:
    """``"baseline=3,grokfast=2"`` -> ``{"baseline": 3, "grokfast": 2}``; ``"none"`` or ``""`` -> ``{}``."""
    out: Dict[str, int] = {}
    if text.strip().lower() in ("", "none"):
        return out
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in ALL_METHODS or not value.strip().isdigit() or int(value) < 1:
            raise SystemExit(f"--method-seeds: expected method=N with a method from {ALL_METHODS} and N >= 1, "
                             f"got {item!r}")
        out[name] = int(value)
    return out


def seeds_per_method(methods, seeds: int, method_seeds: Dict[str, int]) -> Dict[str, int]:
    """Seeds per method: ``min(seeds, method_seeds[m])`` for the listed methods, else ``seeds``."""
    return {m: min(seeds, method_seeds.get(m, seeds)) for m in methods}


def tasks_for(n_seeds: Dict[str, int]):
    """(method, seed) pairs, the slow methods first (longest-first packing for the process pool)."""
    slow = [(m, s) for s in range(max(n_seeds.values(), default=0)) for m in n_seeds
            if m in SLOW_METHODS and s < n_seeds[m]]
    fast = [(m, s) for s in range(max(n_seeds.values(), default=0)) for m in n_seeds
            if m not in SLOW_METHODS and s < n_seeds[m]]
    return slow + fast


def run_all(cfg: Config, n_seeds: Dict[str, int], jobs: int) -> List[Dict]:
    tasks = tasks_for(n_seeds)
    runs: List[Dict] = []
    bar = common.tqdm_bar(total=len(tasks), desc=f"{NAME} runs", unit="run")
    try:
        if jobs <= 1:
            split = load_split(cfg)
            for m, s in tasks:
                r = run_one(cfg, m, s, split=split, progress=True)
                runs.append(r)
                bar.update(1)
                bar.set_postfix_str(_short(r))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_worker, (cfg, m, s)) for m, s in tasks]
                for fut in as_completed(futs):
                    r = fut.result()
                    runs.append(r)
                    bar.update(1)
                    bar.set_postfix_str(_short(r))
    finally:
        bar.close()
    return runs


def makespan(tasks, cost: Dict, workers: int) -> float:
    """Finish time of ``tasks`` (in submission order) on ``workers`` dedicated cores, each task
    going to the first free worker (what the process pool does), with ``cost[task]`` seconds each."""
    free = [0.0] * max(1, workers)
    for t in tasks:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += cost[t]
    return max(free) if tasks else 0.0


def _short(r: Dict) -> str:
    if r["grokked"]:
        return f"{r['method']} s{r['seed']}: grokked at {r['grok_step']} steps, {r['grok_seconds']:.1f}s"
    return f"{r['method']} s{r['seed']}: not grokked by {r['steps_run']} steps"


# ------------------------------------------------------------------ reporting


def table_rows(methods, stats):
    rows = []
    for m in methods:
        s = stats[m]
        rows.append([
            m, f"{s['n_grokked']}/{s['n']}",
            summary.fmt_ms(s["steps_mean"], s["steps_std"]),
            summary.fmt_ms(s["seconds_mean"], s["seconds_std"], 1),
            summary.fmt_ms(s["cpu_seconds_mean"], s["cpu_seconds_std"], 1),
            summary.fmt_ms(s["phase_steps_mean"], s["phase_steps_std"]),
            summary.fmt_ms(s["phase_seconds_mean"], s["phase_seconds_std"], 1),
            summary.fmt_x(s.get("speedup_steps")), summary.fmt_x(s.get("speedup_seconds")),
            summary.fmt_x(s.get("speedup_cpu_seconds")),
            summary.fmt_p(s.get("p_steps")), summary.fmt_p(s.get("p_seconds")),
        ])
    return rows


TABLE_HEADERS = ["method", "grokked", "steps to grok", "seconds", "CPU seconds", "phase steps", "phase s",
                 "x steps", "x seconds", "x CPU s", "p steps", "p seconds"]


def plot(runs: List[Dict], methods, path: str, threshold: float) -> str:
    def series(key, source="log"):
        return plotting.method_series(runs, methods, key, alpha=0.75, source=source)

    specs = [
        dict(title="test accuracy (dotted: grokked threshold)", xlabel="step", ylabel="accuracy",
             series=series("test_acc"), hline=threshold, logx=True),
        dict(title="train accuracy", xlabel="step", ylabel="accuracy", series=series("train_acc"), logx=True),
        dict(title="centroid alignment cos(x, c(x)) (32 train points)", xlabel="step", ylabel="alignment",
             series=series("centroid_alignment", "monitor"), logx=True),
        dict(title="Jacobian norm ||J||_F (32 train points)", xlabel="step", ylabel="norm",
             series=series("jacobian_norm", "monitor"), logy=True, logx=True),
    ]
    if any(m.startswith("grokalign") for m in methods):  # the other methods log no penalty
        specs.append(dict(title="GrokAlign penalty (weighted, last computed)", xlabel="step", ylabel="penalty",
                          series=series("penalty"), logy=True))
    specs.append(dict(title="weight norm", xlabel="step", ylabel="||theta||", series=series("weight_norm"), logx=True))
    return plotting.panels(path, specs, title="grok-digits: Omnigrok MLP (weights x8) on the digits")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(ALL_METHODS)}")
    p.add_argument("--method-seeds", default=DEMO_METHOD_SEEDS,
                   help="fewer seeds for some methods, 'method=N,...' (capped at --seeds); default "
                        f"{DEMO_METHOD_SEEDS!r} so `make demo` fits 10 minutes on 2 cores; 'none' gives every "
                        "method --seeds (the full study)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel worker processes, one thread each (default: min(2, cores))")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse")
    p.add_argument("--estimator", choices=("reverse", "forward", "exact"), default=DEFAULT_GROKALIGN["estimator"])
    p.add_argument("--lam", type=float, default=None, help=f"GrokAlign weight (default {DEFAULT_GROKALIGN['weight']})")
    p.add_argument("--squared", action=argparse.BooleanOptionalAction, default=DEFAULT_GROKALIGN["squared"])
    p.add_argument("--ga-every", type=int, default=DEFAULT_GROKALIGN["every"], help="GrokAlign's every=n")
    p.add_argument("--ga-subsample", type=float, default=DEFAULT_GROKALIGN["subsample"],
                   help="GrokAlign's subsample=s (fraction of the batch carrying the penalty)")
    p.add_argument("--num-probes", type=int, default=DEFAULT_GROKALIGN["num_probes"])
    p.add_argument("--backend", default="auto", help="GrokAlign backend (auto, reference, cpp, triton)")
    p.add_argument("--max-steps", type=int, default=None, help="step cap (default 60000; quick 300)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 100)")
    p.add_argument("--threshold", type=float, default=None, help="grokked test accuracy (default 0.89; MNIST 0.85)")
    p.add_argument("--init-scale", type=float, default=8.0)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def config_from_args(args) -> Config:
    cfg = Config(loss=args.loss, ga_estimator=args.estimator, ga_squared=args.squared, ga_every=args.ga_every,
                 ga_subsample=args.ga_subsample,
                 ga_probes=args.num_probes, ga_backend=args.backend, threshold=args.threshold, init_scale=args.init_scale,
                 n_train=args.n_train, data_dir=args.data_dir, dtype=args.dtype)
    if args.lam is not None:
        cfg.ga_weight = args.lam
    if args.quick:
        cfg = replace(cfg, max_steps=300, eval_every=50, monitor_every=100)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.eval_every is not None:
        cfg.eval_every = args.eval_every
    return cfg


def main(args) -> Dict:
    t0 = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {ALL_METHODS}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    n_seeds = seeds_per_method(methods, seeds, parse_method_seeds(args.method_seeds))
    jobs = 1 if args.quick else max(1, args.jobs)
    cfg = config_from_args(args)
    out = common.out_dir(args.out, NAME)
    split = load_split(cfg)
    threshold = threshold_for(cfg, split)
    notes = [
        f"data: {split.name}, {len(split.x_train)} train / {len(split.x_test)} test; grokked = test accuracy "
        f">= {threshold} checked every {cfg.eval_every} steps; step cap {cfg.max_steps} (a capped run is not grokked)",
        "seeds: " + ", ".join(f"{m} {k}" for m, k in n_seeds.items())
        + (" (fewer seeds of some methods so the default demo fits 10 minutes on 2 cores; "
           "--method-seeds none for the full study)" if min(n_seeds.values()) < seeds else ""),
        f"GrokAlign: weight {cfg.ga_weight}, squared={cfg.ga_squared}, every={cfg.ga_every}, "
        f"subsample={cfg.ga_subsample}, "
        f"estimator={cfg.ga_estimator!r}, num_probes={cfg.ga_probes}, backend={cfg.ga_backend!r}",
        "seconds: training steps only (wall, perf_counter; CPU: thread_time), one thread per run, "
        f"{jobs} run(s) in parallel; evaluation and monitoring excluded",
    ]
    print(f"[{NAME}] " + "\n[{NAME}] ".format(NAME=NAME).join(notes), flush=True)
    runs = run_all(cfg, n_seeds, jobs)
    stats = summary.summarise(runs, methods, baseline="baseline" if "baseline" in methods else None)
    rows = table_rows(methods, stats)
    table = common.print_table(TABLE_HEADERS, rows, title=f"{NAME}: time to the grokked state "
                               f"(mean +- std over seeds; x = speed-up vs baseline; p = Welch t-test)")

    # logs
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs))
    common.write_csv(os.path.join(out, "monitor.csv"), common.log_rows(runs, "monitor"))
    run_keys = ["method", "seed", "grokked", "grok_step", "grok_seconds", "grok_cpu_seconds", "mem_step",
                "mem_seconds", "phase_steps", "phase_seconds", "steps_run", "capped", "final_train_acc",
                "final_test_acc", "train_seconds", "train_cpu_seconds", "monitor_seconds", "run_seconds",
                "run_cpu_seconds"]
    common.write_csv(os.path.join(out, "runs.csv"), runs, run_keys)
    png = plot(runs, methods, os.path.join(out, "curves.png"), threshold)
    bars = plotting.bars(os.path.join(out, "seconds_to_grok.png"), methods,
                         [stats[m]["seconds_mean"] for m in methods], [stats[m]["seconds_std"] for m in methods],
                         ylabel="seconds to grok", title=f"{NAME}: wall seconds to the grokked state", logy=True)
    wall = time.perf_counter() - t0
    # What the same runs take on `jobs` uncontended cores: the pool's schedule replayed with each
    # run's CPU time (the machine may be shared; CPU time is what a dedicated core would spend).
    cpu_total = sum(r["run_cpu_seconds"] for r in runs)
    order = tasks_for(n_seeds)
    by_task = {(r["method"], r["seed"]): r for r in runs}
    overhead = max(0.0, wall - makespan(order, {t: r["run_seconds"] for t, r in by_task.items()}, jobs))
    est = makespan(order, {t: r["run_cpu_seconds"] for t, r in by_task.items()}, jobs) + overhead
    timing = (f"wall time {wall:.0f}s; CPU time of the runs {cpu_total:.0f}s; on {jobs} dedicated core(s) the runs "
              f"would take ~{est:.0f}s (their CPU times replayed through the pool's schedule, plus the "
              f"{overhead:.0f}s of start-up and plotting)")
    result = dict(
        experiment=NAME, quick=bool(args.quick), config=asdict(cfg), methods=methods, baseline="baseline",
        seeds=seeds, seeds_per_method=n_seeds, jobs=jobs, threshold=threshold, data=split.name,
        summary={m: stats[m] for m in methods}, notes=notes, table=table, plots=[png, bars],
        wall_seconds=wall, cpu_seconds_total=cpu_total, estimated_dedicated_wall_seconds=est, timing=timing,
        runs=[{k: r[k] for k in run_keys} for r in runs],
    )
    common.write_json(os.path.join(out, "summary.json"), result)
    print(f"[{NAME}] wrote {out}/summary.json, log.csv, monitor.csv, runs.csv, curves.png, "
          f"seconds_to_grok.png\n[{NAME}] {timing}", flush=True)
    return result
