"""More levers for grok-digits: weight schedules, probe laws and cheaper penalty schedules.

    .venv/bin/python bench/digits_levers.py VARIANT [--seeds 0,1,2,3,4]

Runs ``grok_digits.run_one(cfg, "grokalign", seed)`` (the default configuration of ``make demo``:
``GrokAlign(model, 5e-3, squared=True, every=4, subsample=0.25)``, the output-space estimator)
with one change and prints, per seed, the steps to grok and the CPU seconds of the training steps.
VARIANT is one of:

- ``default``;
- ``decay:T0:f``: the weight times ``f`` from step ``T0`` on (strong first, weaker once the Jacobian
  norm has come down);
- ``boost:T0:f``: the weight times ``f`` before step ``T0``, the default weight after;
- ``probes:LAW``: the probe law (``sphere`` is the default for the output-space estimator;
  ``rademacher``, ``gaussian``);
- ``kw:every=E,subsample=S,weight=W``: GrokAlign's own arguments.

One thread per run; the steps do not depend on the machine's load, the seconds do.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from grokalign_fast import GrokAlign  # noqa: E402
from grokalign_fast.experiments import grok_digits  # noqa: E402


def scheduled(factor_at):
    """A GrokAlign whose weight is ``weight * factor_at(step)`` at each call."""

    class ScheduledGrokAlign(GrokAlign):
        def forward(self, x):
            if not hasattr(self, "base_weight"):
                self.base_weight = self.weight
            self.weight = self.base_weight * factor_at(self.step)
            return super().forward(x)

    return ScheduledGrokAlign


def with_probes(law):
    class ProbesGrokAlign(GrokAlign):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "probes": law})

    return ProbesGrokAlign


def configure(variant: str, cfg):
    """Applies ``variant`` (the GrokAlign class the experiment builds, or the config); returns cfg."""
    kind, _, rest = variant.partition(":")
    if kind == "default":
        return cfg
    if kind in ("decay", "boost"):
        t0, f = rest.split(":")
        t0, f = int(t0), float(f)
        factor_at = (lambda s: f if s >= t0 else 1.0) if kind == "decay" else (lambda s: f if s < t0 else 1.0)
        grok_digits.GrokAlign = scheduled(factor_at)
        return cfg
    if kind == "probes":
        grok_digits.GrokAlign = with_probes(rest)
        return cfg
    if kind == "kw":
        for item in rest.split(","):
            key, value = item.split("=")
            if key == "every":
                cfg.ga_every = int(value)
            elif key == "subsample":
                cfg.ga_subsample = float(value)
            elif key == "weight":
                cfg.ga_weight = float(value)
            else:
                raise SystemExit(f"kw: unknown key {key!r} (every, subsample, weight)")
        return cfg
    raise SystemExit(f"unknown variant {variant!r}; see the module docstring")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--max-steps", type=int, default=None, help="step cap (default: the experiment's, 60000)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = configure(args.variant, grok_digits.Config())
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        run = grok_digits.run_one(cfg, "grokalign", seed)
        results.append((run["grok_step"], None if run["grok_cpu_seconds"] is None else round(run["grok_cpu_seconds"], 2)))
    print(args.variant, results, flush=True)


if __name__ == "__main__":
    main()
