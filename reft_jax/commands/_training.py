"""The shell every `reft <trainer> --config FILE [overrides]` command shares: argument parsing,
and one error path. Each failure ends in one line on stderr and its own exit status:

    2    a bad config, data file, missing model / checkpoint, or an unusable run directory
    1    training diverged or collapsed (the last good checkpoint is kept and named)
    130  interrupted (Ctrl-C): nothing half-written; the line says where the run resumes
    0    done; the summary is printed as JSON (also when Ctrl-C lands after the last step was
         saved: only the plots are left undrawn)

Once the run directory exists, everything the command prints is also appended to
`<run_dir>/log.txt` (`runlog.RunLog`), and the one error line ends with ` (log: <path>)`: the
log holds what the line leaves out (the traceback and the exception chain). Errors before that
(a bad config, an unusable run directory) are the one line alone.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
from typing import Any, Callable

EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


def add_config_arguments(parser: argparse.ArgumentParser, config_name: str, example: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML file filling {config_name} (experiments/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"config overrides, e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit without training")


def fail(command: str, kind: str, message: Any, status: int, err: BaseException | None = None,
         log: Any = None) -> int:
    """Print the one error line (with the log's path once there is a log, which gets `err`'s
    traceback); returns `status`."""
    from reft_jax.runlog import describe_error

    path = log.open() if log is not None else None
    if path is not None and err is not None:
        log.detail(describe_error(err))
    print(f"reft {command}: {kind}: {message}" + (f" (log: {path})" if path is not None else ""),
          file=sys.stderr, flush=True)
    return status


def run_dir_of(cfg: Any, args: argparse.Namespace) -> pathlib.Path | None:
    """The directory a command's run lives in: `run_dir`, or that of the `--mode` section
    (`online.run_dir`; offline self-training's `offline.sft.run_dir`)."""
    node = getattr(cfg, args.mode, None) if getattr(args, "mode", None) else cfg
    while node is not None:
        if getattr(node, "run_dir", ""):
            return pathlib.Path(node.run_dir)
        node = getattr(node, "sft", None)
    return None


def run_training(command: str, config_cls: type, runner: Callable[[Any], dict],
                 args: argparse.Namespace, diverged: tuple[type[BaseException], ...] = (),
                 print_summary: bool = True) -> int:
    """Load `config_cls` from `--config` + overrides and run `runner(cfg)`; returns the exit code.
    `print_summary=False` for runners that print their own report (the demo's table); they
    also run more than one training loop, so a Ctrl-C after one of them is an interruption."""
    from reft_jax import config as config_lib
    from reft_jax import distributed
    from reft_jax.checkpoint import plain_warnings
    from reft_jax.runlog import RunLog

    try:
        cfg = config_lib.load_config(config_cls, args.config, args.overrides)
    except config_lib.ConfigError as err:
        return fail(command, "error", err, EXIT_CONFIG)
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    distributed.initialize()  # a no-op for one process
    config = ["--config", args.config] if args.config else []
    header = shlex.join(["reft", *command.split(), *config, *args.overrides])
    # a damaged checkpoint skipped on resume is one `reft <cmd>: warning: ...` line, as in eval
    with RunLog(run_dir_of(cfg, args), header) as log, plain_warnings(command):
        return _run_logged(command, runner, cfg, diverged, print_summary, log)


def _run_logged(command: str, runner: Callable[[Any], dict], cfg: Any,
                diverged: tuple[type[BaseException], ...], print_summary: bool, log: Any) -> int:
    from reft_jax import config as config_lib
    from reft_jax.checkpoint import CheckpointError
    from reft_jax.data.formats import DataError
    from reft_jax.runlog import describe_error
    from reft_jax.train import loop
    from reft_jax.train.loop import TrainingDiverged, TrainingInterrupted

    loop.last_finished.clear()
    try:
        summary = runner(cfg)
    except (config_lib.ConfigError, DataError, FileNotFoundError, CheckpointError) as err:
        return fail(command, "error", err, EXIT_CONFIG, err, log)
    except (NotADirectoryError, PermissionError, IsADirectoryError, FileExistsError) as err:
        return fail(command, "error", f"run directory unusable: {err}", EXIT_CONFIG, err, log)
    except (TrainingDiverged, *diverged) as err:
        return fail(command, "training diverged", err, EXIT_DIVERGED, err, log)
    except TrainingInterrupted as err:
        return fail(command, "interrupted", err, EXIT_INTERRUPTED, err, log)
    except KeyboardInterrupt as err:
        if not loop.last_finished:  # before the loop started: nothing was trained or written yet
            return fail(command, "interrupted", "before training started; nothing was written", EXIT_INTERRUPTED,
                        err, log)
        done = loop.last_finished[-1]
        if not print_summary:  # a command of several training loops: one of them is done
            return fail(command, "interrupted", f"after a training loop finished (step {done['step']} in "
                        f"{done['run_dir']}); run the same command to go on", EXIT_INTERRUPTED, err, log)
        # the last step is saved: only the plots are missing (`reft report` draws them)
        log.detail(describe_error(err))
        print(f"reft {command}: interrupted after the last step was saved; the run is complete (plots not drawn)",
              file=sys.stderr, flush=True)
        summary = done
    if print_summary:
        try:
            print(json.dumps(summary, indent=2, default=str), flush=True)
        except KeyboardInterrupt:  # the run is done: a Ctrl-C now only cuts the printout
            pass
    return 0
