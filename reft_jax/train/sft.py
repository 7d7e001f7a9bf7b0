"""SFT, the ReFT warm-up (reference §6): the pure `sft_step` and its batches, run by the one loop.

Everything that must be exact is a pure function of saved state: the epoch order is a function
of `(seed, epoch)`, the data position `(epoch, batch)` and the TrainState are in each checkpoint,
so a killed run that restarts in the same `run_dir` continues bit-for-bit.

ReFT's warm-up is the epoch-k checkpoint of the 40-epoch run, with the LR schedule computed for all
40 epochs: `epochs` sizes the schedule, `stop_after_epoch` stops early, and `warmup_epoch` copies
that epoch's state into `run_dir/warmup` (what PPO starts from; `ModelSpec(step="warmup")`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer
from reft_jax.data.batches import (Encoded, bucket_length, bucket_sizes, epoch_batches, pad_sft_batch,
                                   steps_per_epoch)
from reft_jax.data.formats import Example
from reft_jax.data.prompts import encode_sft, special_ids
from reft_jax.data.lengths import fit_examples
from reft_jax.data.sources import split_source
from reft_jax.data.splits import Splits, load_examples, tokenizer_corpus
from reft_jax.distributed import process_batch_slice
from reft_jax.metrics import plot_metrics
from reft_jax.model.config import ModelConfig
from reft_jax.train import loop, sharded
from reft_jax.train.run import RunConfig, build_policy, compute_dtype, open_or_start, plan_memory
from reft_jax.train.sft_step import make_sft_step
from reft_jax.train.state import make_optimizer, make_schedule, num_warmup_steps


@dataclasses.dataclass
class SFTConfig(RunConfig):
    """One SFT run. Defaults are ReFT's recipe (batch 48, lr 1e-5, 10% warm-up, 40 epochs)."""

    keep: int = 3
    epochs: int = 40  # sizes the LR schedule
    stop_after_epoch: int | None = None  # train only up to here (the schedule still spans `epochs`)
    batch_size: int = 48  # global, in examples
    bucket: int = 64  # padded lengths are multiples of this: few compiled shapes
    warmup_epoch: int | None = 2  # also save the end of this epoch into run_dir/warmup
    # None: the loss is the token mean over the global batch (accumulation-invariant). k: the mean
    # of the token means of k-example groups, ReFT's loss (k = 3, its per-GPU micro-batch).
    loss_group: int | None = None

    def validate(self) -> None:
        self.validate_run()
        for name in ("epochs", "batch_size", "bucket"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))
        for name in ("stop_after_epoch", "warmup_epoch"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= self.epochs:
                raise config_lib.ConfigError(f"must be in [1, epochs={self.epochs}]", key=name, value=value)
        if self.optim.grad_accum != "auto" and self.batch_size % self.optim.grad_accum:
            raise config_lib.ConfigError(f"must be a multiple of optim.grad_accum={self.optim.grad_accum}",
                                         key="batch_size", value=self.batch_size)
        if self.loss_group is not None:
            micro = self.batch_size // (1 if self.optim.grad_accum == "auto" else self.optim.grad_accum)
            if micro % self.loss_group:
                raise config_lib.ConfigError(f"must divide the micro-batch of {micro} examples "
                                             "(batch_size / optim.grad_accum)", key="loss_group",
                                             value=self.loss_group)

    @property
    def last_epoch(self) -> int:
        return self.stop_after_epoch or self.epochs


def make_batch(encoded: Sequence[Encoded], indices: Sequence[int], batch_size: int, bucket: int,
               max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded batch of `batch_size` rows (a short last batch gets zero-weight rows),
    padded to the bucketed length of its longest example."""
    items = [encoded[i] for i in indices]
    length = bucket_length(max(len(it.ids) for it in items), bucket, max_len)
    return pad_sft_batch(items, length, pad_id, batch_size)


def fit_training_examples(cfg: SFTConfig, tokenizer: Any, train: Sequence[Example],
                          extra_train: Sequence[Example] = ()) -> list[Encoded]:
    """The encoded training examples after `data.overlong` (drop | truncate | error) has dealt
    with those longer than `data.max_len`, each case counted and reported in one line. Extra
    rows (offline self-training's samples) carry complete targets, encoded verbatim."""
    parts = []
    for rows, engine, where in ((train, cfg.data.engine, split_source(cfg.data, "train")),
                                (extra_train, "python", "self-training samples")):
        if not rows:
            continue
        whole = [encode_sft(tokenizer, ex, engine, None) for ex in rows]
        kept, report = fit_examples(whole, rows, cfg.data.max_len, cfg.data.overlong, where)
        if report.line():
            print(f"[sft] {report.line()}", flush=True)
        parts += kept
    if not parts:
        raise config_lib.ConfigError("no training example fits (see data.overlong)", key="data.max_len",
                                     value=cfg.data.max_len)
    return parts


def with_lr(step: Callable, schedule: Callable) -> Callable:
    """Adds the scheduled LR of the step to its metrics (inside the jitted function)."""

    def stepped(state, batch):
        new, metrics = step(state, batch)
        return new, {**metrics, "lr": schedule(state.step)}

    return stepped


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
        "lengths": (str(bucket_sizes(cfg.bucket, cfg.data.max_len)), "the shape buckets: one compile each"),
        "mesh": (str(dict(mesh.shape)), f"{mesh.devices.size} devices"),
        "params": (model_config.num_params(), f"{model_config.num_layers} layers, d {model_config.hidden_size}"),
    }


def evaluate_splits(params: Any, run: Any, splits: Splits, epoch: float, seed: int, executor: Any,
                    prefix: str) -> dict[str, float]:
    """Greedy top-1 (and voting@k) on the test and validation rows; predictions to
    run_dir/eval/epochNNN_<split>.jsonl. `prefix`: sft (SFT's prompt) | rollout (the RL prefix)."""
    from reft_jax.eval import evaluate as ev

    cfg, out = run.cfg, {}
    for name, rows in (("test", splits.test), ("val", splits.val)):
        if not rows:
            continue
        rng = jax.random.fold_in(jax.random.key(seed), int(epoch))  # not from the state: eval
        result = ev.evaluate(params, run.model_config, run.tokenizer, rows, cfg.data, cfg.eval, rng,
                             run.mesh, executor, vote_k=cfg.eval.vote_k, prefix=prefix,
                             clean_up_spaces=cfg.eval.clean_up_spaces)
        if jax.process_index() == 0:
            ev.write_predictions(run.run_dir / "eval" / f"epoch{int(epoch):03d}_{name}.jsonl", result["predictions"])
        out.update({f"{name}_{k}": float(v) for k, v in result["metrics"].items()})
    return out


def eval_executor(cfg: Any, stack: contextlib.ExitStack) -> Any:
    """A program sandbox for P-CoT evaluation with `eval.timeout` per program (None for N-CoT)."""
    if cfg.data.engine != "python":
        return None
    from reft_jax.reward.sandbox import ProgramExecutor, SandboxConfig

    return stack.enter_context(ProgramExecutor(SandboxConfig(timeout=cfg.eval.timeout)))


@dataclasses.dataclass
class SFTTrainer(loop.Trainer):
    """SFT's own parts: its batches (bucketed, in the `(seed, epoch)` order) and its step."""

    cfg: SFTConfig | None = None
    splits: Splits | None = None
    encoded: list[Encoded] = dataclasses.field(default_factory=list)
    step_fn: Callable | None = None
    warm: Checkpointer | None = None
    executor: Any = None
    _order: tuple[int, list] | None = None

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return make_batch(self.encoded, indices, self.cfg.batch_size, self.cfg.bucket, self.cfg.data.max_len,
                          special_ids(self.run.tokenizer).pad)

    def step(self, state, step, epoch, bi, upcoming):
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_batches(len(self.encoded), self.cfg.batch_size, self.cfg.seed, epoch))
        host = self.batch(self._order[1][bi])
        local = jax.tree.map(lambda x: x[process_batch_slice(self.cfg.batch_size, self.run.mesh)], host)
        state, metrics = self.step_fn(state, parallel.shard_batch(local, self.run.mesh))
        return state, {**metrics, "tokens_in_batch": int(host["attention_mask"].sum())}

    def record(self, m, epoch, bi, seconds):
        rate = m["tokens_in_batch"] / max(seconds, 1e-9)
        rec = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens_per_s": rate,
               "target_tokens": m["tokens"], "epoch": epoch + (bi + 1) / self.steps_per_epoch}
        if self.cfg.nan_policy == "skip":
            rec["nonfinite"] = int(m["nonfinite"])
        return rec

    def has_eval(self) -> bool:
        return bool(self.splits.test or self.splits.val)

    def evaluate(self, params, epoch, step):
        return evaluate_splits(params, self.run, self.splits, epoch, self.cfg.seed, self.executor, "sft")

    def before_save(self, state, meta):
        """The warm-up copy goes first: should the run die between the two saves, it resumes
        before this step and redoes it."""
        if self.warm is not None and meta["epoch_end"] == self.cfg.warmup_epoch \
                and meta["step"] not in self.warm.all_steps():
            self.warm.save(meta["step"], state, meta)

    def summary(self, out, records):
        rates = [r["tokens_per_s"] for r in records]
        return {**out, "train_loss": records[-1]["loss"] if records else float("nan"),
                "tokens_per_s": float(np.median(rates)) if rates else None}


def run_sft(cfg: SFTConfig, *, extra_train: Sequence[Example] = (),
            _after_step: Callable[[int, Any], Any] | None = None) -> dict[str, Any]:
    """Train (or continue training) `cfg.run_dir`; returns a summary of this invocation.

    `extra_train`: rows added to the training split whose `answer_cot` is the complete target,
    used verbatim (offline self-training's sampled solutions; pass the same rows on resume).
    `_after_step(step, state)`: the loop's test hook (poison the state, or raise)."""
    cfg.validate()
    with contextlib.ExitStack() as stack:
        mesh = parallel.build_mesh(cfg.mesh)
        splits = load_examples(cfg.data, cfg.seed)
        # sized before the examples are fitted: only this optimizer's state structure is used
        total_steps = steps_per_epoch(len(splits.train) + len(extra_train), cfg.batch_size) * cfg.epochs
        tx = make_optimizer(cfg.optim, total_steps)

        def fresh():
            corpus = tokenizer_corpus(splits.train, cfg.data.engine) if cfg.model.path is None else None
            model_config, params, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
            return model_config, tokenizer, sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)

        run, state, meta = open_or_start(cfg, "sft", stack, mesh, total_steps, f"{cfg.eval.select_on}_accuracy",
                                         fresh)
        plan_memory(run, "sft", batch=cfg.batch_size, seq_len=cfg.data.max_len)
        cfg.validate()  # again, now that `auto` settings are resolved
        parallel.check_batch(cfg.batch_size, cfg.optim.grad_accum, mesh)
        encoded = fit_training_examples(cfg, run.tokenizer, splits.train, extra_train)
        total_steps = steps_per_epoch(len(encoded), cfg.batch_size) * cfg.epochs  # the schedule spans what trains
        tx = make_optimizer(cfg.optim, total_steps)
        print(f"[sft] {run.run_dir}\n" + config_lib.describe_derived(
            derived_sizes(cfg, splits, encoded, run.model_config, mesh, total_steps)), flush=True)
        step_fn = loop.keep_finite(with_lr(make_sft_step(run.model_config, tx, cfg.optim.grad_accum,
                                                         compute_dtype(cfg.optim), cfg.model.logprob_chunk,
                                                         cfg.loss_group),
                                           make_schedule(cfg.optim, total_steps)))
        trainer = SFTTrainer(
            name="sft", run=run, steps_per_epoch=steps_per_epoch(len(encoded), cfg.batch_size),
            last_epoch=cfg.last_epoch, best_name=f"{cfg.eval.select_on}_accuracy", fetch_late=True,
            cfg=cfg, splits=splits, encoded=encoded,
            warm=stack.enter_context(Checkpointer(run.run_dir / "warmup", keep=None)) if cfg.warmup_epoch else None,
            executor=eval_executor(cfg, stack) if splits.test or splits.val else None)
        # one jitted step; it compiles once per length bucket
        trainer.step_fn = sharded.jit_step(step_fn, state, trainer.batch([0]), mesh)
        _, summary = loop.train(trainer, state, meta, stack, _after_step)
    plot_metrics(run.run_dir)
    return summary
