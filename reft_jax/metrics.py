"""Run observability: metrics as JSON lines + TensorBoard scalars, PNG curves, progress bars and a
per-phase step timer (the run's `log.txt` is `runlog.py`).

`metrics.jsonl` is the record of truth (one flushed line per write, so a crash loses nothing
already logged, and a resumed run simply appends); TensorBoard and the PNGs are views of it.
Only process 0 writes, so multi-host runs produce one record.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import sys
import time
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
        after it, so their records are dropped first (each step appears once; `-1` = a fresh
        start over the file of an attempt stopped before its first checkpoint, whose steps are
        all redone; None = append as is)."""
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
                from tensorboardX import SummaryWriter  # noqa: PLC0415 - only where used
                # purge_step: TensorBoard hides events at or after it written before the restart
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(logdir=str(self.run_dir / "tb"), purge_step=purge)

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
    reports, but every 30 s instead of many times a second, so logs stay short. `TQDM_DISABLE=1`
    turns bars off, as it does for tqdm's own defaults."""
    if disable is None:
        disable = jax.process_index() != 0 or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
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
