"""Run observability: metrics as JSON lines + TensorBoard scalars, PNG curves, progress bars, a
per-phase step timer and the run's log (`log.txt`: everything a training command printed).

`metrics.jsonl` is the record of truth (one flushed line per write, so a crash loses nothing
already logged, and a resumed run simply appends); TensorBoard and the PNGs are views of it.
Only process 0 writes, so multi-host runs produce one record.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

RESERVED = ("step", "time")  # keys every record carries


def _scalar(key: str, value: Any) -> int | float:
    """A host Python number from a jax/numpy/Python scalar (bools count as 0/1)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {key!r}: expected a scalar, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        return int(arr.item())
    if arr.dtype.kind == "f":
        return float(arr.item())
    raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}")


def truncate_after(path: Path, step: int) -> int:
    """Drop the records of `path` whose step is after `step`, atomically; returns how many.
    The step-0 evaluation of a fresh run is kept when resuming from 0 (it is not redone)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a crash mid-write: dropped
            continue
        if row_step <= step:
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsWriter:
    """Appends `{"step", "time", **metrics}` to `run_dir/metrics.jsonl` and scalars to
    `run_dir/tb`. Disabled (a no-op) on processes other than 0 unless `enabled` says otherwise."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool | None = None,
                 tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: a run resumed from the checkpoint of this step will redo the steps
        after it, so their records are dropped first (each step appears once; `0` = a fresh
        start over an old file, None = append as is)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                truncate_after(self.path, resume_step)
            self._jsonl = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                self._tb = self._tensorboard(resume_step)

    def _tensorboard(self, resume_step: int | None) -> Any:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only where used

        # purge_step: TensorBoard hides events at or after it written before the restart
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(logdir=str(self.run_dir / "tb"), purge_step=purge)

    def drop_after(self, step: int) -> int:
        """Drop the records after `step` from the file being appended to (and hide them in
        TensorBoard), as opening with `resume_step=step` does; returns how many. A run that
        found no checkpoint drops them all (`-1`): they are an earlier attempt's, stopped before
        its first checkpoint, and will be logged again."""
        if self._jsonl is None:
            return 0
        self._jsonl.close()
        dropped = truncate_after(self.path, step)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if dropped and self._tb is not None:
            self._tb.close()
            self._tb = self._tensorboard(step)
        return dropped

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Record `metrics` at `step` under `prefix/`; returns the record written. Device values
        are fetched in one transfer. NaN/inf are recorded as they are (JSON `NaN`)."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        host = jax.device_get(list(metrics.values()))  # a list: dict pytrees sort their keys
        values = {}
        for key, value in zip(metrics, host):
            name = f"{prefix}{key}"
            if name in RESERVED:
                raise ValueError(f"metric name {name!r} is reserved; use another name")
            values[name] = _scalar(name, value)
        record = {"step": int(step), "time": time.time(), **values}
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, float(value), global_step=int(step))
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a `metrics.jsonl`, in file order; undecodable lines (a run killed mid-write)
    are skipped with a warning."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                warnings.warn(f"{path}: skipping undecodable line {number}: {err}", stacklevel=2)
    return rows


# --- plots ------------------------------------------------------------------------------------


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key, sorted by step; a step logged twice (a resumed run
    re-logging the steps after its checkpoint) keeps its latest value."""
    by_step = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[row["step"]] = value
    steps = np.array(sorted(by_step), dtype=np.float64)
    return steps, np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)


def _group(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else "other"


def plot_metrics(run_dir: str | os.PathLike, keys: Sequence[str] | None = None,
                 out_dir: str | os.PathLike | None = None) -> list[Path]:
    """One PNG per metric group (`train/...`, `eval/...`, ungrouped keys in `other`), a grid
    with one panel per metric against step. `keys` are fnmatch patterns (`"eval/*"`).
    Writes to `run_dir/plots` by default and returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy
    from matplotlib.figure import Figure  # noqa: PLC0415

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    names = list(dict.fromkeys(k for row in rows for k in row if k not in RESERVED))
    if keys is not None:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in keys)]
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_group(name), []).append(name)

    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    written = []
    for group, members in groups.items():
        cols = min(3, len(members))
        rows_n = math.ceil(len(members) / cols)
        fig = Figure(figsize=(4.8 * cols, 3.2 * rows_n), layout="constrained")
        FigureCanvasAgg(fig)
        for i, name in enumerate(members):
            ax = fig.add_subplot(rows_n, cols, i + 1)
            steps, values = _series(rows, name)
            ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3,
                    linewidth=1.2)
            ax.set_title(name.removeprefix(f"{group}/"), fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run_dir.name}: {group}", fontsize=12)
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{group.replace(os.sep, '_')}.png"
        fig.savefig(target, dpi=100)
        written.append(target)
    return written


# --- progress and timing ----------------------------------------------------------------------


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "it", disable: bool | None = None, **kwargs: Any) -> tqdm:
    """tqdm bar with throughput, shown on process 0 only. Off a terminal (CI logs) it still
    reports, but every 30 s instead of many times a second, so logs stay short."""
    if disable is None:
        disable = jax.process_index() != 0
    interval = 0.5 if sys.stderr.isatty() else 30.0
    options = {"mininterval": interval, "maxinterval": max(interval, 10.0), "dynamic_ncols": True}
    options.update(kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **options)


class _Span:
    """Handle of one timed block; `block(x)` makes the block's end wait for `x` on device."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def block(self, tree: Any) -> Any:
        self.pending.append(tree)
        return tree


class Timer:
    """Per-phase wall-clock totals: `with timer("rollout") as span: out = span.block(f(x))`.

    JAX dispatch is asynchronous, so an unblocked span measures dispatch only; blocking is
    opt-in because it stalls the pipeline and should be used only where the breakdown matters.
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[_Span]:
        span = _Span()
        start = time.perf_counter()
        try:
            yield span
            if span.pending:
                jax.block_until_ready(span.pending)
        finally:
            self._totals[name] = self._totals.get(name, 0.0) + time.perf_counter() - start

    def summary(self, reset: bool = False, prefix: str = "") -> dict[str, float]:
        """Seconds per phase since the last reset (e.g. `prefix="time/"` to log them)."""
        out = {f"{prefix}{name}": seconds for name, seconds in self._totals.items()}
        if reset:
            self._totals = {}
        return out


# --- the run's log ----------------------------------------------------------------------------

LOG_NAME = "log.txt"


def _shown(line: str) -> str:
    """What a terminal last showed of a line rewritten with carriage returns (a progress bar):
    its last non-blank version."""
    if "\r" not in line:
        return line
    return next((part.rstrip() for part in reversed(line.split("\r")) if part.strip()), "")


def describe_error(err: BaseException) -> str:
    """An exception's traceback with its whole chain, including a context its one-line message
    hides (`raise ... from None`)."""
    text = "".join(traceback.format_exception(err))
    hidden = err.__context__ if err.__suppress_context__ else None
    if hidden is not None:
        text = "".join(traceback.format_exception(hidden)) + "\n(which led to)\n\n" + text
    return text


class _Tee:
    """A text stream that writes through to `stream` and hands each line to the run log."""

    def __init__(self, stream: Any, log: RunLog):
        self.stream, self.log, self.line = stream, log, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        self.log._take(self, text)
        return written

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


class RunLog:
    """Appends what a command prints (`sys.stdout` and `sys.stderr`, and logging handlers that
    write to them) to `run_dir/log.txt`, from the moment the run directory exists; what was
    printed before that is written first, after a header line. Each line is written once it is
    complete, a progress bar's carriage-return updates at their last state. `detail(text)`
    writes to the log only (the traceback a one-line error leaves out); an exception leaving the
    `with` block is written there too. Processes other than 0 write `log.<process>.txt`.

    Python-level only: what native code writes to the file descriptors (XLA's C++ logging)
    reaches the terminal, not the log."""

    def __init__(self, run_dir: str | os.PathLike | None, header: str = ""):
        name = LOG_NAME if jax.process_index() == 0 else f"log.{jax.process_index()}.txt"
        self.path = Path(run_dir) / name if run_dir else None
        self._file = None
        self._early: list[str] = [f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} ===\n"]
        self._lock = threading.RLock()
        self._saved: tuple[Any, Any] | None = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        self._tees: list[_Tee] = []

    def open(self) -> Path | None:
        """The log's path, opening it now if the run directory exists; None while it does not
        (or when the log cannot be written: the command goes on without one)."""
        with self._lock:
            if self._file is None and self.path is not None and self.path.parent.is_dir():
                try:
                    self._file = open(self.path, "a", encoding="utf-8")
                    self._file.write("".join(self._early))
                    self._file.flush()
                except OSError:
                    self._file, self.path = None, None
                self._early = []
            return self.path if self._file is not None else None

    def _write(self, text: str) -> None:
        with self._lock:
            if self.open() is None:
                if self.path is not None:  # the run directory may come: keep it for then
                    self._early.append(text)
                return
            try:
                self._file.write(text)
                self._file.flush()
            except (OSError, ValueError):  # disk full, closed: the run goes on without its log
                self._file, self.path = None, None

    def _take(self, tee: _Tee, text: str) -> None:
        with self._lock:
            tee.line += text
            if "\n" in tee.line:
                *done, tee.line = tee.line.split("\n")
                self._write("".join(_shown(line) + "\n" for line in done))
            if "\r" in tee.line:  # a bar redrawn in place: keep what it shows and its newest draw
                head, _, last = tee.line.rpartition("\r")
                head = _shown(head + "\r")
                tee.line = f"{head}\r{last}" if head else last

    def detail(self, text: str) -> None:
        """Write `text` to the log only."""
        self._write(text if text.endswith("\n") else text + "\n")

    def __enter__(self) -> RunLog:
        self._saved = sys.stdout, sys.stderr
        self._tees = [_Tee(sys.stdout, self), _Tee(sys.stderr, self)]
        sys.stdout, sys.stderr = self._tees
        loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                          if isinstance(x, logging.Logger))]
        for handler in {h for x in loggers for h in x.handlers}:  # made before: they hold the real streams
            if isinstance(handler, logging.StreamHandler) and handler.stream in self._saved:
                tee = self._tees[self._saved.index(handler.stream)]
                self._handlers.append((handler, handler.setStream(tee)))
        return self

    def __exit__(self, etype, err, tb) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        sys.stdout, sys.stderr = self._saved
        with self._lock:
            for tee in self._tees:
                if tee.line:
                    self._take(tee, "\n")
            if err is not None:
                self.detail(describe_error(err))
            if self._file is not None:
                self._file.close()
            self._file, self.path = None, None  # a stream still held by a thread writes through
