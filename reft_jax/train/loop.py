"""The one training loop every trainer runs: SFT, PPO, self-training and the verifier.

A trainer owns only what is its own: its jitted step (`Trainer.step`, which dispatches one step
and returns its metrics) and its evaluation (`Trainer.evaluate`). Everything else is here, once:

* iteration from the exact-resume position `(epoch, batch)` of the restored checkpoint, the
  epoch order being a pure function of `(seed, epoch)` inside the trainer;
* the progress bar; `train/*` records (fetched one step late when the trainer says its step
  never needs the host, so the device does not wait);
* evaluation every `eval.every_epochs` epochs, after the last one, and every `eval.every_steps`
  steps; the best checkpoint by the trainer's metric (`checkpoint.improves`: ties go to the newer);
* checkpoints at epoch ends, at every evaluation and every `save_every_steps`, with the meta every run writes
  (`step, epoch, batch, epoch_end, best, eval, history, config`);
* one divergence policy (`nan_policy`): a step whose loss or gradient norm is not finite (or
  whose update was skipped for it) stops the run with one line naming the step and the last
  good checkpoint (`stop`), or is dropped and logged (`skip`: the step function kept the old
  state). Params are checked before every checkpoint, so no non-finite state is ever saved.
  The collapse guard (`guard.*`) stops a run whose gradient norm stays at zero, whose loss sits
  at ln(vocab) (a uniform distribution) or whose policy entropy collapses.
* Ctrl-C: the run stops between steps with nothing half-written and says where it will resume
  (a save in flight finishes as the run closes, or is removed when it resumes).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from reft_jax import config as config_lib
from reft_jax.checkpoint import improves
from reft_jax.metrics import progress

NAN_POLICIES = ("stop", "skip")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's own: one per XLA compile


class CompileLog:
    """What XLA compiled in this process, from JAX's monitoring events: seconds in all and
    compiles per function name (a persistent-cache hit counts, with its short load time)."""

    seconds = 0.0
    counts: collections.Counter = collections.Counter()

    @classmethod
    def on_event(cls, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            cls.seconds += duration
            cls.counts[kwargs.get("fun_name", "?")] += 1


jax.monitoring.register_event_duration_secs_listener(CompileLog.on_event)


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf, or the run collapsed; nothing was saved after
    the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C between steps; the message says where the run will resume."""


# The summaries of the `train` calls of this process that ran to the end, every step saved: a
# Ctrl-C that lands after the last one (while the command draws its plots) cut nothing short.
last_finished: list[dict[str, Any]] = []


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Inside, a Ctrl-C waits for the block to end and is raised after it (a second one is raised
    at once). For Orbax's saves: an interrupt inside one lands in its wait for the previous save
    (which then logs a traceback) or between its steps. Only the main thread can hold signals,
    and only the default SIGINT handler is replaced; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def keep_finite(step: Callable) -> Callable:
    """Wrap a pure step so a non-finite loss or gradient norm keeps the old state (inside the
    jitted function) and reports `nonfinite` = 1. Under `nan_policy=stop` the loop then stops;
    under `skip` the update is simply dropped."""

    def guarded(state, batch):
        new, metrics = step(state, batch)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        new = jax.lax.cond(ok, lambda: new, lambda: state)
        return new, {**metrics, "nonfinite": (~ok).astype(jnp.int32)}

    return guarded


@dataclasses.dataclass
class GuardConfig:
    """The collapse guard: a run that is finite but dead. A window of `window` consecutive
    steps trips it when the gradient norm stays below `min_grad_norm`, or the training loss
    stays within `uniform_tolerance` of ln(vocab) (the model predicts a uniform distribution),
    or the policy entropy (PPO) stays below `min_entropy`. `window: 0` turns the guard off."""

    window: int = 20
    min_grad_norm: float = 1e-12
    uniform_tolerance: float = 1e-3
    min_entropy: float = 0.0  # 0 = entropy not watched

    def validate(self) -> None:
        if self.window < 0:
            raise config_lib.ConfigError("must be >= 0 (0 = off)", key="window", value=self.window)


class _Collapse:
    """Counts consecutive collapsed steps per symptom."""

    def __init__(self, cfg: GuardConfig, vocab_size: int | None):
        self.cfg, self.uniform = cfg, math.log(vocab_size) if vocab_size else None
        self.runs: dict[str, int] = {}

    def symptom(self, rec: dict[str, float]) -> str | None:
        if not self.cfg.window:
            return None
        c = self.cfg
        found = {
            f"gradient norm below {c.min_grad_norm:g}": rec.get("grad_norm", 1.0) < c.min_grad_norm,
            f"loss at ln(vocab) = {self.uniform or 0:.4f} (a uniform distribution)":
                self.uniform is not None and "loss" in rec and abs(rec["loss"] - self.uniform) < c.uniform_tolerance,
            f"policy entropy below {c.min_entropy:g}": c.min_entropy > 0 and rec.get("entropy", math.inf) < c.min_entropy,
        }
        for what, hit in found.items():
            self.runs[what] = self.runs.get(what, 0) + 1 if hit else 0
            if self.runs[what] >= c.window:
                return what
        return None


@dataclasses.dataclass
class Trainer:
    """What one trainer gives the loop. Subclasses set the fields and implement `step` and
    `evaluate`; everything else has a default."""

    name: str  # log prefix and progress-bar label
    run: Any  # train.run.Run: config, run_dir, mesh, checkpointer, writer, model
    steps_per_epoch: int
    last_epoch: int  # train up to the end of this (1-based) epoch
    best_name: str | None  # eval metric that picks the best checkpoint; None = no best
    eval_at_start: bool = False  # evaluate the initial params (epoch 0) on a fresh run
    fetch_late: bool = False  # metrics are device arrays: fetch them one step late
    max_steps: int | None = None  # stop this invocation after so many steps
    loss_is_nll: bool = True  # the loss is a token cross-entropy (the collapse guard's ln(vocab) test)

    def step(self, state: Any, step: int, epoch: int, batch: int, upcoming: tuple[int, int] | None
             ) -> tuple[Any, dict]:
        """Dispatch step `step` (0-based: the step about to be taken) at `(epoch, batch)`;
        `upcoming` is the next position (host work for it may overlap the device)."""
        raise NotImplementedError

    def record(self, metrics: dict[str, float], epoch: int, batch: int, seconds: float) -> dict[str, float]:
        """The `train/*` record of a step from its fetched metrics."""
        return {**metrics, "epoch": epoch + (batch + 1) / self.steps_per_epoch}

    def postfix(self, rec: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{rec.get('loss', float('nan')):.4f}"}

    def has_eval(self) -> bool:
        return True

    def evaluate(self, params: Any, epoch: float, step: int) -> dict[str, float]:
        """Evaluation metrics (also written by the trainer where it keeps predictions)."""
        return {}

    def before_save(self, state: Any, meta: dict) -> None:
        """Called just before a checkpoint is saved (SFT copies the warm-up epoch here)."""

    def summary(self, out: dict[str, Any], records: list[dict[str, float]]) -> dict[str, Any]:
        """The invocation's summary (what the command prints); `records` are its train records."""
        return out


@dataclasses.dataclass
class _Pending:
    step: int  # 1-based: the step count once this step is done
    epoch: int
    batch: int
    metrics: dict
    compiled: float = 0.0  # seconds XLA spent compiling while this step was dispatched


class _Log:
    """Fetches, checks and records each step's metrics (late when the trainer allows it)."""

    def __init__(self, trainer: Trainer, bar, last_good: Callable[[], str]):
        self.t, self.bar, self.last_good = trainer, bar, last_good
        cfg = trainer.run.cfg
        self.nan_policy = cfg.nan_policy
        vocab = getattr(trainer.run.model_config, "vocab_size", None) if trainer.loss_is_nll else None
        self.collapse = _Collapse(cfg.guard, vocab)
        self.pending: _Pending | None = None
        self.clock = time.perf_counter()
        self.last: dict[str, float] = {}
        self.records: list[dict[str, float]] = []

    def diverged(self, what: str, item: _Pending) -> None:
        raise TrainingDiverged(
            f"{what} at step {item.step} (epoch {item.epoch + 1}, batch {item.batch + 1}/"
            f"{self.t.steps_per_epoch}); the run stopped without saving it. {self.last_good()} "
            "Lower optim.lr (or raise kl_coef), check the data, or set nan_policy=skip.")

    def restart_clock(self) -> None:
        """After an evaluation or a checkpoint, so their time (and compiles) do not count as the
        next step's."""
        self.clock = time.perf_counter()

    def push(self, item: _Pending) -> None:
        self.flush()
        self.pending = item
        if not self.t.fetch_late:
            self.flush()

    def flush(self) -> None:
        item, self.pending = self.pending, None
        if item is None:
            return
        host = {k: (float(v) if np.ndim(v) == 0 else v) for k, v in jax.device_get(item.metrics).items()}
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        bad = [k for k in ("loss", "grad_norm") if k in host and not math.isfinite(host[k])]
        if (bad or host.get("nonfinite", 0)) and self.nan_policy == "stop":
            self.diverged(f"non-finite loss {host.get('loss')} (grad norm {host.get('grad_norm')})", item)
        rec = self.t.record(host, item.epoch, item.batch, seconds)
        rec["compile_seconds"] = item.compiled
        self.t.run.writer.write(item.step, rec, prefix="train")
        self.last = rec
        self.records.append(rec)
        if not (bad or host.get("nonfinite", 0)):
            what = self.collapse.symptom(rec)
            if what is not None:
                self.diverged(f"collapsed: {what} for {self.collapse.cfg.window} steps", item)
        self.bar.update(1)
        self.bar.set_postfix(**self.t.postfix(rec), refresh=False)


def _positions(trainer: Trainer, epoch0: int, batch0: int) -> list[tuple[int, int]]:
    pos = [(e, b) for e in range(epoch0, trainer.last_epoch)
           for b in range(batch0 if e == epoch0 else 0, trainer.steps_per_epoch)]
    return pos[:trainer.max_steps] if trainer.max_steps is not None else pos


def train(trainer: Trainer, state: Any, meta: dict, stack: Any,
          after_step: Callable[[int, Any], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Run `trainer` from the position in `meta` ({} = fresh) to its last epoch (or max_steps);
    returns the final state and a summary. `after_step(step, state)` is a test hook called
    after each dispatched step; it may return a replacement state (to poison it) or raise."""
    run, cfg = trainer.run, trainer.run.cfg
    epoch0, batch0, step = meta.get("epoch", 0), meta.get("batch", 0), meta.get("step", 0)
    best, last_eval = meta.get("best"), dict(meta.get("eval") or {})
    history = list(meta.get("history") or [])
    saved = [meta.get("step")]

    def last_good() -> str:
        return (f"The last good checkpoint is step {saved[0]} in {run.ckpt.directory}." if saved[0] is not None
                else "No checkpoint was saved yet.")

    def evaluate(epoch: float) -> dict[str, float]:
        nonlocal best, last_eval
        start = time.perf_counter()
        metrics = trainer.evaluate(state.params, epoch, step)
        if not metrics:
            return {}
        metrics = {**metrics, "seconds": time.perf_counter() - start}
        run.writer.write(step, {**metrics, "epoch": epoch}, prefix="eval")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "seconds")
        print(f"[{trainer.name}] eval at step {step} (epoch {epoch:g}): {shown}", flush=True)
        last_eval = metrics
        history.append({"epoch": epoch, "step": step, **metrics})
        value = metrics.get(trainer.best_name) if trainer.best_name else None
        if value is not None and (best is None or improves(value, best["value"])):
            best = {"name": trainer.best_name, "value": value, "epoch": epoch, "step": step}
        return metrics

    positions = _positions(trainer, epoch0, batch0)
    bar = stack.enter_context(progress(total=step + len(positions), initial=step, desc=trainer.name, unit="step"))
    log = _Log(trainer, bar, last_good)
    if not meta and trainer.eval_at_start and trainer.has_eval():
        evaluate(0)
    every_steps = getattr(cfg.eval, "every_steps", 0)
    try:
        for i, (epoch, bi) in enumerate(positions):
            compiled = CompileLog.seconds
            upcoming = positions[i + 1] if i + 1 < len(positions) else None
            state, metrics = trainer.step(state, step, epoch, bi, upcoming)
            compiled = CompileLog.seconds - compiled
            step += 1
            if after_step is not None:
                state = after_step(step, state) or state
            log.push(_Pending(step, epoch, bi, metrics, compiled))
            end = bi == trainer.steps_per_epoch - 1
            eval_now = trainer.has_eval() and (
                (end and ((cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0)
                         or epoch + 1 == trainer.last_epoch))
                or (every_steps and step % every_steps == 0))
            # an evaluated step is saved too: the best checkpoint must exist (ReFT saves at every eval)
            save_now = end or eval_now or (cfg.save_every_steps and step % cfg.save_every_steps == 0)
            if not (eval_now or save_now):
                continue
            log.flush()  # never evaluate or checkpoint a step whose metrics were not checked
            at = epoch + 1 if end else epoch + (bi + 1) / trainer.steps_per_epoch
            metrics_now = evaluate(at) if eval_now else {}
            if save_now:
                if not bool(all_finite(state.params)):  # a finite loss does not prove finite params
                    log.diverged("non-finite params after the update", _Pending(step, epoch, bi, {}))
                meta = {"step": step, "epoch": epoch + 1 if end else epoch, "batch": 0 if end else bi + 1,
                        "epoch_end": epoch + 1 if end else None, "best": best, "eval": last_eval,
                        "history": history, "config": config_lib.to_dict(cfg)}
                value = metrics_now.get(trainer.best_name) if trainer.best_name else None
                with interrupts_held():  # a save is started whole; it commits in the background
                    trainer.before_save(state, meta)
                    run.ckpt.save(step, state, meta, metric=value)
                    saved[0] = step
            log.restart_clock()
        log.flush()
        out = {"run_dir": str(run.run_dir), "step": step, "epochs_done": meta.get("epoch", epoch0),
               "train": log.last, "eval": last_eval, "best": best, "history": history}
        summary = trainer.summary(out, log.records)
    except KeyboardInterrupt:
        # a save in flight commits as the run closes (the checkpointer waits for it); a process
        # killed before that leaves a step without its commit marker, which resuming removes
        log.pending = None
        where = f"step {saved[0]}" if saved[0] is not None else "the start"
        raise TrainingInterrupted(
            f"interrupted at step {step}; nothing half-written. Run the same command to resume from {where} "
            f"({run.ckpt.directory}).") from None
    with interrupts_held():  # every step is trained: a Ctrl-C now waits for the last commit, then
        run.ckpt.wait()  # finds the run finished
        last_finished.append(summary)
    return state, summary
