"""The paper's experiments: ``python -m grokalign_fast.experiments <name> [--seeds N] [--quick] [--data-dir D] [--out DIR]``.

Each experiment is a module with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``main(args) -> dict``; it writes ``<out>/<name>/summary.json`` plus CSV logs and PNG plots.
"""
from __future__ import annotations

import importlib

# name -> module (imported lazily: each pulls in matplotlib / scipy only when run)
EXPERIMENTS = {
    "grok-digits": "grok_digits",
    "xor": "xor",
    "ntk": "ntk",
    "cnn-robustness": "cnn_robustness",
    "inhibit": "inhibit",
    "modadd": "modadd",
    "sparse-parity": "sparse_parity",
    "quadratic-modadd": "quadratic_modadd",
}


def load(name: str):
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")


def run(name: str, argv=()):
    """Run experiment ``name`` with command-line style arguments (as ``python -m``); returns its summary dict."""
    from .__main__ import main

    return main([name, *argv])
