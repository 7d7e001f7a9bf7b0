"""The shell every `reft <trainer> --config FILE [overrides]` command shares: argument parsing,
and one error path. Each failure ends in one line on stderr and its own exit status:

    2    a bad config, data file, missing model / checkpoint, or an unusable run directory
    1    training diverged or collapsed (the last good checkpoint is kept and named)
    130  interrupted (Ctrl-C): nothing half-written; the line says where the run resumes
    0    done; the summary is printed as JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


def add_config_arguments(parser: argparse.ArgumentParser, config_name: str, example: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML file filling {config_name} (experiments/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"config overrides, e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit without training")


def fail(command: str, kind: str, err: BaseException, status: int) -> int:
    print(f"reft {command}: {kind}: {err}", file=sys.stderr)
    return status


def run_training(command: str, config_cls: type, runner: Callable[[Any], dict],
                 args: argparse.Namespace, diverged: tuple[type[BaseException], ...] = (),
                 print_summary: bool = True) -> int:
    """Load `config_cls` from `--config` + overrides and run `runner(cfg)`; returns the exit code.
    `print_summary=False` for runners that print their own report (the demo's table)."""
    from reft_jax import config as config_lib
    from reft_jax import distributed
    from reft_jax.checkpoint import CheckpointError
    from reft_jax.data.formats import DataError
    from reft_jax.train.loop import TrainingDiverged, TrainingInterrupted

    try:
        cfg = config_lib.load_config(config_cls, args.config, args.overrides)
    except config_lib.ConfigError as err:
        return fail(command, "error", err, EXIT_CONFIG)
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    distributed.initialize()  # a no-op for one process
    try:
        summary = runner(cfg)
    except (config_lib.ConfigError, DataError, FileNotFoundError, CheckpointError) as err:
        return fail(command, "error", err, EXIT_CONFIG)
    except (NotADirectoryError, PermissionError, IsADirectoryError, FileExistsError) as err:
        return fail(command, "error", f"run directory unusable: {err}", EXIT_CONFIG)
    except (TrainingDiverged, *diverged) as err:
        return fail(command, "training diverged", err, EXIT_DIVERGED)
    except TrainingInterrupted as err:
        return fail(command, "interrupted", err, EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # before the loop started: nothing was trained or written yet
        return fail(command, "interrupted", "before training started; nothing was written", EXIT_INTERRUPTED)
    if print_summary:
        print(json.dumps(summary, indent=2, default=str))
    return 0
