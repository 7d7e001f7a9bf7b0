"""The shell every `reft <trainer> --config FILE [overrides]` command shares: argument parsing,
config errors as one line (exit 2), divergence as one line (exit 1), the summary as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable


def add_config_arguments(parser: argparse.ArgumentParser, config_name: str, example: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML file filling {config_name} (experiments/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"config overrides, e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit without training")


def run_training(command: str, config_cls: type, runner: Callable[[Any], dict],
                 args: argparse.Namespace, diverged: tuple[type[BaseException], ...] = (),
                 print_summary: bool = True) -> int:
    """Load `config_cls` from `--config` + overrides and run `runner(cfg)`; returns the exit code.
    `print_summary=False` for runners that print their own report (the demo's table)."""
    from reft_jax import config as config_lib
    from reft_jax import distributed
    from reft_jax.data.sources import DataError

    try:
        cfg = config_lib.load_config(config_cls, args.config, args.overrides)
    except config_lib.ConfigError as err:
        print(f"reft {command}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    distributed.initialize()  # a no-op for one process
    try:
        summary = runner(cfg)
    except (config_lib.ConfigError, DataError, FileNotFoundError) as err:
        print(f"reft {command}: error: {err}", file=sys.stderr)
        return 2
    except diverged as err:
        print(f"reft {command}: training diverged: {err}", file=sys.stderr)
        return 1
    if print_summary:
        print(json.dumps(summary, indent=2, default=str))
    return 0
