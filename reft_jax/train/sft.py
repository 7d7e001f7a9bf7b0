"""SFT, the ReFT warm-up (reference §6), as a thin resumable loop around the pure `sft_step`.

The loop owns only the shell: data order, checkpoints, metrics, evaluation. Everything that must
be exact is a pure function of saved state: the epoch order is a function of `(seed, epoch)`, the
data position `(epoch, batch)` and the TrainState are in each checkpoint, so a killed run that
restarts in the same `run_dir` continues bit-for-bit.

ReFT's warm-up is the epoch-k checkpoint of the 40-epoch run, with the LR schedule computed for all
40 epochs: `epochs` sizes the schedule, `stop_after_epoch` stops early, and `warmup_epoch` copies
that epoch's state into `run_dir/warmup` (what PPO starts from; `ModelSpec(step="warmup")`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer, improves
from reft_jax.data.batches import Encoded, bucket_length, epoch_batches, pad_sft_batch, steps_per_epoch
from reft_jax.data.prompts import encode_sft, special_ids
from reft_jax.data.sources import Example
from reft_jax.distributed import process_batch_slice
from reft_jax.metrics import MetricsWriter, plot_metrics, progress
from reft_jax.model.config import ModelConfig
from reft_jax.data.splits import Splits, load_examples, tokenizer_corpus
from reft_jax.parallel import MeshConfig, build_mesh, check_batch
from reft_jax.train import sharded
from reft_jax.train.loop import NAN_POLICIES, TrainingDiverged, all_finite
from reft_jax.train.run import (DataConfig, EvalConfig, ModelSpec, build_policy, config_drift, open_run,
                                save_run_artifacts, state_abstract)
from reft_jax.train.sft_step import make_sft_step
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer, make_schedule, num_warmup_steps

@dataclasses.dataclass
class SFTConfig:
    """One SFT run. Defaults are ReFT's recipe (batch 48, lr 1e-5, 10% warm-up, 40 epochs)."""

    run_dir: str
    seed: int = 42
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    epochs: int = 40  # sizes the LR schedule
    stop_after_epoch: int | None = None  # train only up to here (the schedule still spans `epochs`)
    batch_size: int = 48  # global, in examples
    bucket: int = 64  # padded lengths are multiples of this: few compiled shapes
    warmup_epoch: int | None = 2  # also save the end of this epoch into run_dir/warmup
    save_every_steps: int = 0  # mid-epoch checkpoints (preemption); 0 = end of epochs only
    keep: int = 3  # latest checkpoints kept, plus the best one
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    nan_policy: str = "stop"  # stop: raise, keep the last good checkpoint | skip: drop the update

    def validate(self) -> None:
        if not self.run_dir:
            raise config_lib.ConfigError("a run directory is required", key="run_dir", value=self.run_dir)
        for name in ("epochs", "batch_size", "bucket", "keep"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))
        for name in ("stop_after_epoch", "warmup_epoch"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= self.epochs:
                raise config_lib.ConfigError(f"must be in [1, epochs={self.epochs}]", key=name, value=value)
        if self.save_every_steps < 0:
            raise config_lib.ConfigError("must be >= 0", key="save_every_steps", value=self.save_every_steps)
        if self.nan_policy not in NAN_POLICIES:
            raise config_lib.ConfigError(f"must be one of {NAN_POLICIES}", key="nan_policy",
                                         value=self.nan_policy)
        if self.batch_size % self.optim.grad_accum:
            raise config_lib.ConfigError(f"must be a multiple of optim.grad_accum={self.optim.grad_accum}",
                                         key="batch_size", value=self.batch_size)

    @property
    def last_epoch(self) -> int:
        return self.stop_after_epoch or self.epochs


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def make_batch(encoded: Sequence[Encoded], indices: Sequence[int], batch_size: int, bucket: int,
               max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded batch of `batch_size` rows (a short last batch gets zero-weight rows),
    padded to the bucketed length of its longest example."""
    items = [encoded[i] for i in indices]
    length = bucket_length(max(len(it.ids) for it in items), bucket, max_len)
    return pad_sft_batch(items, length, pad_id, batch_size)


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------
def guard_step(step: Callable, schedule: Callable, nan_policy: str) -> Callable:
    """Adds the scheduled LR to the metrics; with `skip`, a non-finite update is dropped inside
    the jitted step (the old state is kept) and `skipped` = 1 is reported."""

    def guarded(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        new, metrics = step(state, batch)
        metrics = {**metrics, "lr": schedule(state.step)}
        if nan_policy == "skip":
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new = jax.lax.cond(ok, lambda: new, lambda: state)
            metrics["skipped"] = (~ok).astype(jnp.int32)
        return new, metrics

    return guarded


def _fresh_state(cfg: SFTConfig, mesh: Mesh, train: list[Example], tx) -> tuple[ModelConfig, Any, TrainState]:
    corpus = tokenizer_corpus(train, cfg.data.engine) if cfg.model.path is None else None
    model_config, params, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
    return model_config, tokenizer, sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)


# ----------------------------------------------------------------------------------------------
# Per-step logging with a one-step lag (the host reads step k's metrics after dispatching k+1)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics are still on the device, and where it was in the data."""

    step: int
    epoch: int
    batch: int
    num_batches: int
    metrics: dict
    tokens: int


class _StepLog:
    """Fetches, checks and records each step's metrics; one step late so the device never waits
    for the host, except at checkpoints and evaluations (`flush`)."""

    def __init__(self, writer: MetricsWriter, bar, nan_policy: str, last_good: Callable[[], str]):
        self.writer, self.bar, self.nan_policy, self.last_good = writer, bar, nan_policy, last_good
        self.pending: _Pending | None = None
        self.clock = time.perf_counter()
        self.last_loss = float("nan")
        self.tokens_per_s: list[float] = []

    def diverged(self, what: str, item: _Pending) -> None:
        raise TrainingDiverged(
            f"{what} step {item.step} (epoch {item.epoch + 1}, batch {item.batch + 1}/{item.num_batches}); "
            f"stopped without saving. {self.last_good()} Lower optim.lr, check the data, or set "
            "nan_policy=skip.")

    def check_params(self, params: Any, item: _Pending) -> None:
        """A finite loss does not prove finite params (the update after it may overflow):
        checked before every checkpoint, so no NaN state is ever saved."""
        if not bool(all_finite(params)):
            self.diverged("non-finite params after", item)

    def restart_clock(self) -> None:
        """After an evaluation or a checkpoint, so their time does not count as step time."""
        self.clock = time.perf_counter()

    def push(self, item: _Pending) -> None:
        self.flush()
        self.pending = item

    def flush(self) -> None:
        item, self.pending = self.pending, None
        if item is None:
            return
        host = {k: float(v) for k, v in jax.device_get(item.metrics).items()}
        now = time.perf_counter()
        rate = item.tokens / max(now - self.clock, 1e-9)
        self.clock = now
        if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])) \
                and self.nan_policy == "stop":
            self.diverged(f"non-finite loss {host['loss']} (grad norm {host['grad_norm']}) at", item)
        self.last_loss = host["loss"]
        self.tokens_per_s.append(rate)
        record = {"loss": host["loss"], "lr": host["lr"], "grad_norm": host["grad_norm"],
                  "tokens_per_s": rate, "target_tokens": host["tokens"],
                  "epoch": item.epoch + (item.batch + 1) / item.num_batches}
        if "skipped" in host:
            record["skipped"] = int(host["skipped"])
        self.writer.write(item.step, record, prefix="train")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{rate:,.0f}", refresh=False)


# ----------------------------------------------------------------------------------------------
# Evaluation hook
# ----------------------------------------------------------------------------------------------
def _evaluate_splits(state: TrainState, model_config: ModelConfig, tokenizer: Any, splits: Splits,
                     cfg: SFTConfig, epoch: int, mesh: Mesh, executor: Any,
                     run_dir: pathlib.Path) -> dict[str, float]:
    """Greedy top-1 (and voting@k) on test and val; predictions to run_dir/eval/*.jsonl."""
    from reft_jax.eval import evaluate as ev

    out: dict[str, float] = {}
    for name, rows in (("test", splits.test), ("val", splits.val)):
        if not rows:
            continue
        rng = jax.random.fold_in(jax.random.key(cfg.seed), epoch)  # not from the state: eval
        result = ev.evaluate(state.params, model_config, tokenizer, rows, cfg.data, cfg.eval, rng,
                             mesh, executor, vote_k=cfg.eval.vote_k, prefix="sft")
        if jax.process_index() == 0:
            ev.write_predictions(run_dir / "eval" / f"epoch{epoch:03d}_{name}.jsonl", result["predictions"])
        out.update({f"{name}_{k}": v for k, v in result["metrics"].items()})
    return out


def _executor(cfg: SFTConfig, stack: contextlib.ExitStack) -> Any:
    """A program sandbox for P-CoT evaluation (None for N-CoT)."""
    if cfg.data.engine != "python":
        return None
    from reft_jax.reward.sandbox import ProgramExecutor, SandboxConfig

    return stack.enter_context(ProgramExecutor(SandboxConfig(timeout=cfg.eval.timeout)))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def derived_sizes(cfg: SFTConfig, splits: Splits, encoded: Sequence[Encoded], model_config: ModelConfig,
                  mesh: Mesh, total_steps: int) -> dict[str, Any]:
    spe = steps_per_epoch(len(encoded), cfg.batch_size)
    mean_len = float(np.mean([len(e.ids) for e in encoded]))
    return {
        "examples": (len(splits.train), f"val {len(splits.val)}, test {len(splits.test)}"),
        "steps/epoch": (spe, f"ceil({len(encoded)} / batch {cfg.batch_size})"),
        "total steps": (total_steps, f"{cfg.epochs} epochs: the LR schedule's length"),
        "steps this run": (spe * cfg.last_epoch, f"up to epoch {cfg.last_epoch}"),
        "warm-up steps": (num_warmup_steps(cfg.optim, total_steps), cfg.optim.schedule),
        "tokens/step": (int(mean_len * cfg.batch_size), f"mean example {mean_len:.0f} tokens, unpadded"),
        "micro-batch": (cfg.batch_size // cfg.optim.grad_accum, f"grad_accum {cfg.optim.grad_accum}"),
        "mesh": (str(dict(mesh.shape)), f"{mesh.devices.size} devices"),
        "params": (model_config.num_params(), f"{model_config.num_layers} layers, d {model_config.hidden_size}"),
    }


@dataclasses.dataclass
class _Run:
    """What the loop reads: built once by `_setup`, never changed by the loop."""

    cfg: SFTConfig
    run_dir: pathlib.Path
    mesh: Mesh
    splits: Splits
    encoded: list[Encoded]
    model_config: ModelConfig
    tokenizer: Any
    step_fn: Callable
    ckpt: Checkpointer
    warm: Checkpointer | None
    writer: MetricsWriter
    executor: Any
    best_name: str

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return make_batch(self.encoded, indices, self.cfg.batch_size, self.cfg.bucket, self.cfg.data.max_len,
                          special_ids(self.tokenizer).pad)

    def evaluates(self, epoch: int) -> bool:
        """Evaluation after this (1-based) epoch: every `every_epochs` and after the last."""
        has_rows = bool(self.splits.test or self.splits.val)
        return has_rows and (epoch % self.cfg.eval.every_epochs == 0 or epoch == self.cfg.last_epoch)


def _setup(cfg: SFTConfig, stack: contextlib.ExitStack, extra_train: Sequence[Example] = ()
           ) -> tuple[_Run, TrainState, dict]:
    """Mesh, data, policy (fresh, or the run's own on resume), the jitted step and the sinks.
    Returns the run, the state to continue from and the restored checkpoint meta ({} if fresh)."""
    run_dir = pathlib.Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh)
    check_batch(cfg.batch_size, cfg.optim.grad_accum, mesh)
    splits = load_examples(cfg.data, cfg.seed)
    total_steps = steps_per_epoch(len(splits.train) + len(extra_train), cfg.batch_size) * cfg.epochs
    tx = make_optimizer(cfg.optim, total_steps)
    best_name = f"{cfg.eval.select_on}_accuracy"
    ckpt, restored, model_config, tokenizer = open_run(
        stack, run_dir, cfg.keep, best_name, lambda mc: state_abstract(mc, cfg.optim, total_steps, mesh))
    if restored is None:
        model_config, tokenizer, state = _fresh_state(cfg, mesh, splits.train, tx)
        save_run_artifacts(run_dir, model_config, tokenizer, cfg.optim, total_steps, cfg)
        meta: dict = {}
    else:
        state, meta = restored
        drift = config_drift(meta.get("config", {}), config_lib.to_dict(cfg))
        print(f"[sft] resuming {run_dir} at step {meta['step']} (epoch {meta['epoch'] + 1}, batch "
              f"{meta['batch']})" + ("; config changed: " + "; ".join(drift) if drift else ""), flush=True)

    encoded = [encode_sft(tokenizer, ex, cfg.data.engine, cfg.data.max_len) for ex in splits.train]
    # extra rows carry complete targets: encoded verbatim (P-CoT's sft_target appends nothing)
    encoded += [encode_sft(tokenizer, ex, "python", cfg.data.max_len) for ex in extra_train]
    print(f"[sft] {run_dir}\n" + config_lib.describe_derived(
        derived_sizes(cfg, splits, encoded, model_config, mesh, total_steps)), flush=True)
    compute = None if cfg.optim.compute_dtype == "float32" else cfg.optim.compute_dtype
    step_fn = guard_step(make_sft_step(model_config, tx, cfg.optim.grad_accum, compute),
                         make_schedule(cfg.optim, total_steps), cfg.nan_policy)
    run = _Run(cfg, run_dir, mesh, splits, encoded, model_config, tokenizer, step_fn, ckpt,
               warm=stack.enter_context(Checkpointer(run_dir / "warmup", keep=None)) if cfg.warmup_epoch else None,
               writer=stack.enter_context(MetricsWriter(run_dir)),
               executor=_executor(cfg, stack) if splits.test or splits.val else None, best_name=best_name)
    # one jitted step; it compiles once per length bucket
    run.step_fn = sharded.jit_step(step_fn, state, run.batch([0]), mesh)
    return run, state, meta


def _save(run: _Run, state: TrainState, meta: dict, metric: float | None) -> None:
    """A checkpoint, and at the end of the warm-up epoch the copy PPO starts from. The copy goes
    first: should the run die between the two, it resumes before this step and redoes it."""
    if run.warm is not None and meta["epoch_end"] == run.cfg.warmup_epoch \
            and meta["step"] not in run.warm.all_steps():
        run.warm.save(meta["step"], state, meta)
    run.ckpt.save(meta["step"], state, meta, metric=metric)


def _end_of_epoch_eval(run: _Run, state: TrainState, epoch: int, step: int) -> dict[str, float]:
    metrics = _evaluate_splits(state, run.model_config, run.tokenizer, run.splits, run.cfg, epoch, run.mesh,
                               run.executor, run.run_dir)
    run.writer.write(step, metrics, prefix="eval")
    print(f"[sft] epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return metrics


def run_sft(cfg: SFTConfig, *, extra_train: Sequence[Example] = (),
            _after_step: Callable[[int, TrainState], TrainState | None] | None = None) -> dict[str, Any]:
    """Train (or continue training) `cfg.run_dir`; returns a summary of this invocation.

    `extra_train`: rows added to the training split whose `answer_cot` is the complete target,
    used verbatim (offline self-training's sampled solutions; pass the same rows on resume).

    `_after_step(step, state)` is a test hook called after each dispatched step; it may return a
    replacement state (to poison it) or raise (to simulate a crash).
    """
    cfg.validate()
    with contextlib.ExitStack() as stack:
        run, state, meta = _setup(cfg, stack, extra_train)
        summary = _train(run, state, meta, stack, _after_step)
    plot_metrics(run.run_dir)
    return summary


def _train(run: _Run, state: TrainState, meta: dict, stack: contextlib.ExitStack,
           after_step: Callable | None) -> dict[str, Any]:
    """The epoch loop from the restored position to `last_epoch`."""
    cfg = run.cfg
    n_batches = steps_per_epoch(len(run.encoded), cfg.batch_size)
    epoch0, batch0, step = meta.get("epoch", 0), meta.get("batch", 0), meta.get("step", 0)
    best, last_eval, saved = meta.get("best"), dict(meta.get("eval") or {}), [meta.get("step")]
    bar = stack.enter_context(progress(total=n_batches * cfg.last_epoch, initial=step, desc="sft", unit="step"))
    log = _StepLog(run.writer, bar, cfg.nan_policy, lambda: (
        f"The last good checkpoint is step {saved[0]} in {run.ckpt.directory}." if saved[0] is not None
        else "No checkpoint was saved yet."))
    rows = process_batch_slice(cfg.batch_size, run.mesh)
    for epoch in range(epoch0, cfg.last_epoch):
        order = epoch_batches(len(run.encoded), cfg.batch_size, cfg.seed, epoch)
        for bi in range(batch0 if epoch == epoch0 else 0, len(order)):
            host_batch = run.batch(order[bi])
            local = jax.tree.map(lambda x: x[rows], host_batch)  # this process's rows of it
            state, metrics = run.step_fn(state, parallel.shard_batch(local, run.mesh))
            step += 1
            if after_step is not None:
                state = after_step(step, state) or state
            item = _Pending(step, epoch, bi, len(order), metrics, int(host_batch["attention_mask"].sum()))
            log.push(item)
            end = bi == len(order) - 1
            if not end and not (cfg.save_every_steps and step % cfg.save_every_steps == 0):
                continue
            log.flush()  # never checkpoint a step whose loss was not checked
            log.check_params(state.params, item)
            metric = None
            if end and run.evaluates(epoch + 1):
                last_eval = _end_of_epoch_eval(run, state, epoch + 1, step)
                metric = last_eval.get(run.best_name)
                if metric is not None and (best is None or improves(metric, best["value"])):
                    best = {"name": run.best_name, "value": metric, "epoch": epoch + 1, "step": step}
            meta = {"step": step, "epoch": epoch + 1 if end else epoch, "batch": 0 if end else bi + 1,
                    "epoch_end": epoch + 1 if end else None, "best": best, "eval": last_eval,
                    "config": config_lib.to_dict(cfg)}
            _save(run, state, meta, metric)
            saved[0] = step
            log.restart_clock()
    log.flush()
    run.ckpt.wait()
    return {"run_dir": str(run.run_dir), "step": step, "epochs_done": meta.get("epoch", 0),
            "train_loss": log.last_loss, "eval": last_eval, "best": best,
            "tokens_per_s": float(np.median(log.tokens_per_s)) if log.tokens_per_s else None}
