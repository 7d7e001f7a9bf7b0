"""Orbax checkpoints that let a preempted run continue bit-for-bit, possibly on another mesh.

A step directory holds two items: `state` (the TrainState pytree, written shard by shard by every
process) and `meta` (JSON: data-iterator position, epoch, best metric, resolved config; Orbax's
JSON handler writes it from the primary process only). Orbax writes each step into a temporary
directory and renames it after writing `commit_success.txt`, so a finished step always has the
marker. Restoring walks back from the newest step and skips, loudly, any step that lacks the
marker or cannot be read; unusable steps newer than the one restored are moved aside, because
Orbax refuses to save a step older than its latest and training would otherwise stall there.

Multi-host: every process must call `save`, `restore` and `wait` (Orbax synchronises them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from reft_jax.config import to_dict
from reft_jax.orbax_quirks import drained_orbax_loop

COMMIT_MARKER = "commit_success.txt"  # written by Orbax as the last act of a save
UNUSABLE_DIR = "_unusable"  # where damaged steps are moved; not a step name, so Orbax ignores it
SELFTRAIN_MARKER = "selftrain.json"  # in a self-training run directory: which baseline it is


class CheckpointError(RuntimeError):
    """A checkpoint operation that cannot go on safely (nothing usable, or a step clash)."""


class CheckpointWarning(UserWarning):
    """A checkpoint step was found damaged or partial and is being skipped."""


class _Unusable(Exception):
    """Reason one step cannot be restored."""


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`jax.ShapeDtypeStruct` tree mirroring `tree`, to restore into. `shardings` is one
    `Sharding` for every leaf, a matching tree of them, or None to keep each array's own
    (a different sharding than at save time makes Orbax reshard while reading)."""
    def one(x, sharding=None):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            x = np.asarray(x)
        if sharding is None:
            sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def _jsonable(x: Any, where: str) -> Any:
    """Plain JSON data from meta (numpy/jax scalars, tuples, paths, config dataclasses), checked
    before a save starts so a bad value cannot leave half a checkpoint behind."""
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(to_dict(x), where)
    raise TypeError(f"{where}: {type(x).__name__} value {x!r} is not JSON-serialisable")


def improves(value: float, best: float, mode: Literal["max", "min"] = "max") -> bool:
    """Whether `value` takes over as best from `best`. Ties go to the newer step, as Orbax's
    best-keeping does: a run's own `best` record must name a step that is still on disk."""
    if math.isnan(value):
        return False
    return value >= best if mode == "max" else value <= best


class Checkpointer:
    """Latest `keep` steps plus the best one by `best_metric` (kept even when older).

    `save` is asynchronous: it returns once arrays are copied off the devices (so the state may
    be donated to the next step) and Orbax commits in the background; `wait()` blocks until done
    and raises if the background commit failed.

    `clean_partial=True` deletes temporary directories of saves that were cut short. Only the
    run's sole writer may ask for it: a reader (an evaluator watching a live run) would delete
    the writer's save in flight.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3,
                 best_metric: str | None = None, best_mode: Literal["max", "min"] = "max",
                 keep_best: bool = True, async_save: bool = True, clean_partial: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        text = os.fspath(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self.best_metric, self.best_mode = best_metric, best_mode
        self._barriers = 0
        keep_policy: list[Any] = [policies.LatestN(n=keep)]
        if best_metric is not None and keep_best:
            keep_policy.append(policies.BestN(
                get_metric_fn=self._metric_of, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policy),
            best_fn=self._metric_of if best_metric is not None else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=clean_partial,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def _metric_of(self, metrics: Mapping[str, float]) -> float:
        return float(metrics[self.best_metric])

    # --- saving ---------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None,
             metric: float | None = None) -> None:
        """Write `state` (any pytree of arrays, sharded or not) and JSON `meta` as `step`.
        `metric` ranks the step for best-keeping; NaN never counts as best."""
        step = int(step)
        meta_json = _jsonable(dict(meta or {}), "meta")
        metrics = None
        if metric is not None:
            if self.best_metric is None:
                raise ValueError("save(metric=...) needs Checkpointer(best_metric=<name>)")
            metric = float(metric)
            if math.isnan(metric):
                warnings.warn(f"checkpoint step {step}: metric {self.best_metric} is NaN; "
                              "this step will not be kept as best", CheckpointWarning, 2)
            else:
                metrics = {self.best_metric: metric}
        existing = self._mgr.all_steps()
        if step in existing:
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}")
        if existing and step < max(existing):
            raise CheckpointError(
                f"cannot save step {step}: {self.directory} already has step {max(existing)}; "
                "restore() first (it moves damaged newer steps aside)")
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta_json)),
            metrics=metrics, force=True)

    def wait(self) -> None:
        """Block until every pending asynchronous save is committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- listing --------------------------------------------------------------------------

    def _refresh(self) -> list[int]:
        self.wait()
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def _step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        """Committed steps on disk (those with the commit marker), oldest first."""
        return [s for s in self._refresh() if (self._step_path(s) / COMMIT_MARKER).exists()]

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _ranked_steps(self) -> list[int]:
        """Committed steps with a metric, best first."""
        if self.best_metric is None:
            return []
        scored = []
        for step in self.all_steps():
            metrics = self._mgr.metrics(step)
            if metrics and self.best_metric in metrics:
                value = self._metric_of(metrics)
                scored.append((value if self.best_mode == "max" else -value, step))
        scored.sort(reverse=True)  # best first; ties go to the newer step
        return [step for _, step in scored]

    def best_step(self) -> int | None:
        ranked = self._ranked_steps()
        return ranked[0] if ranked else None

    # --- restoring ------------------------------------------------------------------------

    def restore(self, abstract_state: Any, step: int | None = None
                ) -> tuple[Any, dict] | None:
        """(state, meta) of `step`, or of the newest usable step; None when there is none at all.

        `abstract_state` (see `abstract_like`) gives structure, dtypes and target shardings.
        Damaged steps are skipped with a CheckpointWarning; if every step is damaged, or an
        explicit `step` is, CheckpointError is raised rather than silently starting afresh."""
        steps = self._refresh()[::-1]
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(f"no checkpoint step {step} in {self.directory}; "
                                      f"steps there: {steps[::-1]}")
            return self._restore_first([int(step)], abstract_state, what=f"step {step}")
        return self._restore_first(steps, abstract_state, what="latest", move_aside=True)

    def restore_selected(self, abstract_state: Any, selector: str) -> tuple[Any, dict]:
        """(state, meta) of the checkpoint `selector` names: latest | warmup | best | epoch:K |
        <step>, for readers (`reft eval`, `reft sample`, a PPO start from a warm-up).

        latest / warmup: the newest usable step; damaged newer steps are skipped with a warning,
        as resuming does, but left in place (a reader never moves a run's files). The others name
        one step and raise CheckpointError if it is damaged; FileNotFoundError if it is absent."""
        if selector not in ("latest", "warmup"):
            return self.restore(abstract_state, step=checkpoint_step(self, selector))
        steps = self._refresh()[::-1]
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        state, meta = self._restore_first(steps, abstract_state, what=selector)
        return state, meta

    def read_meta(self, step: int) -> dict:
        """The JSON meta of one step without reading its arrays (e.g. to find an epoch's step)."""
        with drained_orbax_loop():
            return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """(state, meta) of the best usable step by `best_metric`; None when none has a metric."""
        return self._restore_first(self._ranked_steps(), abstract_state, what="best")

    def _restore_first(self, steps: list[int], abstract_state: Any, what: str,
                       move_aside: bool = False) -> tuple[Any, dict] | None:
        if not steps:
            return None
        damaged = []
        for step in steps:
            try:
                result = self._restore_step(step, abstract_state)
            except _Unusable as reason:
                if what.startswith("step "):  # asked for this one step: no older one to try
                    raise CheckpointError(f"checkpoint {what} in {self.directory} is unusable: {reason}") from None
                damaged.append(step)
                warnings.warn(
                    f"\n!!! checkpoint step {step} in {self.directory} is unusable: {reason}\n"
                    f"!!! skipping it and trying an older one", CheckpointWarning, 3)
                continue
            if move_aside and damaged:  # proven damaged: an older step restores fine
                self._move_aside(damaged)
            elif damaged:
                warnings.warn(f"!!! using step {step}, the newest usable checkpoint in {self.directory}",
                              CheckpointWarning, 3)
            return result
        raise CheckpointError(
            f"no usable checkpoint ({what}) in {self.directory}: step(s) {damaged} are damaged "
            "(see warnings above); move them away to start from scratch")

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        path = self._step_path(step)
        if not (path / COMMIT_MARKER).exists():
            raise _Unusable(f"missing {COMMIT_MARKER} (the save never finished)")
        try:
            meta = self.read_meta(step)
        except Exception as err:  # noqa: BLE001 - any failure means this step is unusable
            raise _Unusable(f"meta unreadable: {type(err).__name__}: {_brief(err)}") from err
        if not isinstance(meta, dict):
            raise _Unusable(f"meta is {type(meta).__name__}, not a JSON object")
        try:
            with drained_orbax_loop():  # a damaged step fails one read while others are in flight
                state = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as err:  # noqa: BLE001
            raise _Unusable(f"state unreadable: {type(err).__name__}: {_brief(err)}") from err
        return state, meta

    def _move_aside(self, steps: list[int]) -> None:
        """Move damaged steps to `_unusable/` (kept for inspection) so saves can reuse them."""
        if ocp.multihost.is_primary_host(0):
            graveyard = self.directory / UNUSABLE_DIR
            graveyard.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = graveyard / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                self._step_path(step).rename(target)
                warnings.warn(f"!!! moved damaged checkpoint step {step} to {target}",
                              CheckpointWarning, 4)
        self._barriers += 1
        ocp.multihost.sync_global_processes(f"reft_checkpoint_move_aside_{self._barriers}")
        self._mgr.reload()


def checkpoint_step(ckpt: "Checkpointer", selector: str) -> int:
    """Resolve latest | best | epoch:K | <int> to a step number of `ckpt`."""
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckpt.directory}")
    if selector in ("latest", "warmup"):
        return steps[-1]
    if selector == "best":
        best = ckpt.best_step()
        if best is None:  # a reader that does not know the metric's name: the run's own record
            best = (ckpt.read_meta(steps[-1]).get("best") or {}).get("step")
        if best is None or best not in steps:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint carries a metric, so none is best")
        return best
    if selector.startswith("epoch:"):
        k = int(selector.split(":", 1)[1])
        for s in steps:
            meta = ckpt.read_meta(s)
            if meta.get("epoch_end") == k:
                return s
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint at the end of epoch {k}")
    step = int(selector)
    if step not in steps:
        raise FileNotFoundError(f"{ckpt.directory}: no step {step}; steps there: {steps}")
    return step


def _brief(err: Exception, limit: int = 400) -> str:
    """First line of an error, without tensorstore's long JSON spec dump."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    for dump in (" [tensorstore_spec", " See full TensorStore details"):
        first = first.split(dump)[0]
    if ": Error " in first:  # TensorStore's chain of drivers: the innermost reason says what is wrong
        head, _, last = first.rpartition(": Error ")
        first = f"{head.split(':', 1)[0]}: Error {last}"
    return first[:limit]


@contextlib.contextmanager
def plain_warnings(command: str) -> Iterator[None]:
    """Inside, a CheckpointWarning prints as its own lines (`reft eval: warning: ...`) instead of
    Python's `file:line: CheckpointWarning:` form with a source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            text = "; ".join(part.strip("! ") for part in str(message).strip().splitlines())
            print(f"reft {command}: warning: {text}", file=sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        previous = warnings.showwarning
        warnings.showwarning = show
        yield


def check_run_dir(path: str | os.PathLike) -> None:
    """ConfigError naming `run_dir` unless `path` is (or can be made) a directory this process
    can write: not a regular file, not under one, not on a read-only or virtual file system.
    Creates the directory (a run is about to write there); writes and removes one probe file."""
    from reft_jax.config import ConfigError

    text = os.fspath(path)
    p = pathlib.Path(text)
    if p.exists() and not p.is_dir():
        raise ConfigError("is a file, not a directory; choose another run_dir", key="run_dir", value=text)
    blocker = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"cannot be created: {blocker} is a file", key="run_dir", value=text)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        base = next((a for a in p.parents if a.is_dir()), None)
        raise ConfigError(f"cannot be created in {base}: {err.strerror or err}", key="run_dir",
                          value=text) from None
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".reft-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"is not writable: {err.strerror or err}", key="run_dir", value=text) from None
