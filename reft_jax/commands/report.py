"""`reft report RUN_DIR [RUN_DIR ...] [--out DIR]`: the paper-style table and the plots.

One row per run: top-1, voting@k and rerank@k, each the best over the run's evaluations with the
epoch it came from (the paper selects checkpoints on the test set). Writes every run's curves
into its `plots/`, and `table.md` plus `accuracy_by_epoch.png` (all runs) into `--out`.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="reft run directories")
    parser.add_argument("--out", default="reft_report", help="where the table and comparison plot go")


def run(args: argparse.Namespace) -> int:
    from reft_jax.eval.report import report

    try:
        table, written = report(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"reft report: error: {err}", file=sys.stderr)
        return 2
    print(table)
    print("\nplots:\n" + "\n".join(f"  {p}" for p in written))
    return 0
