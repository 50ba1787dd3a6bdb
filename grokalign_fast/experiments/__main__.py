"""Command line: ``python -m grokalign_fast.experiments <name> [options]`` (``-h`` for each experiment's options)."""
from __future__ import annotations

import argparse
import sys

from . import EXPERIMENTS, load
from .common import setup_torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grokalign_fast.experiments",
                                description="Run one of the GrokAlign paper's experiments.")
    sub = p.add_subparsers(dest="name", required=True, metavar="name")
    for name in EXPERIMENTS:
        mod = load(name)
        sp = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or "").strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1); default per experiment")
        sp.add_argument("--quick", action="store_true", help="scaled-down run (seconds; for CI)")
        sp.add_argument("--data-dir", default=None, help="folder with MNIST IDX files / cifar-10-batches-py")
        sp.add_argument("--out", default="runs", help="output root; results go to <out>/<name>/ (default runs/)")
        mod.add_arguments(sp)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_torch(1)
    return load(args.name).main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
