"""ReFT's PPO stage (reference §5) as a thin, resumable loop around pure device steps.

Per rollout step (one batch of ``batch_questions`` training questions, ``n_samples`` each):
``rollout.RolloutEngine.run`` samples, dispatches the score pass and scores the texts on the
host meanwhile; ``ppo_step.assemble`` turns scores into per-token rewards, GAE advantages and
globally whitened advantages; then ``ppo_epochs`` passes over the batch in minibatches of
``mini_batch_size`` sequences, each one jitted ``ppo_update(state, minibatch)`` with the state
donated. While the updates run on the device, the host encodes the next batch's prefixes.

After every ``eval.every_epochs`` epochs: greedy top-1 on the test (and validation) split with
the rollout prefix and the 700-token cap, a checkpoint, and the best one kept by
``eval.select_on`` (ReFT selects on the test set). Everything that must be exact is a pure
function of saved state: the epoch order of ``(seed, epoch)``, the sampling key of
``(state.rng, step)``, the minibatch order of ``(seed, step, ppo_epoch)``; the data position
and the best metric are in each checkpoint's meta. So a restarted run continues bit-for-bit.

Guard rails: the update skips non-finite steps inside the jitted function; the loop then stops
(``nan_policy: stop``, nothing saved after the last good checkpoint) or logs and goes on
(``skip``). Executor outcomes (ok / error / timeout / rejected) are counted every step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer, improves
from reft_jax.data.batches import epoch_batches, steps_per_epoch
from reft_jax.data.prompts import special_ids
from reft_jax.metrics import MetricsWriter, Timer, plot_metrics, progress
from reft_jax.model.config import ModelConfig
from reft_jax.parallel import MeshConfig
from reft_jax.reward.answers import answer_kind
from reft_jax.reward.reward import RewardConfig
from reft_jax.reward.sandbox import SandboxConfig
from reft_jax.rollout.sampler import SampleConfig
from reft_jax.train import ppo_math, ppo_step, sharded
from reft_jax.train.run import (DataConfig, EvalConfig, ModelSpec, build_policy, save_run_artifacts,
                                   state_abstract)
from reft_jax.rollout.engine import RolloutEngine, encode_prefixes, scores_on_mesh, status_counts
from reft_jax.train.loop import NAN_POLICIES, TrainingDiverged, all_finite
from reft_jax.data.splits import Splits, load_examples, tokenizer_corpus
from reft_jax.train.run import config_drift, open_run
from reft_jax.parallel import build_mesh
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer

__all__ = ["PPOConfig", "TrainingDiverged", "run_ppo", "step_config", "derived_sizes"]

VALUE_HEAD_INITS = ("torch_default", "zeros")


def _ppo_optim() -> OptimConfig:
    return OptimConfig(lr=3e-7, schedule="constant", warmup_ratio=0.0)


def _ppo_eval() -> EvalConfig:
    return EvalConfig(max_new_tokens=700, max_total_len=700)


@dataclasses.dataclass
class PPOConfig:
    """One ReFT PPO run. Defaults are the paper's recipe (reference §5, §8b).

    Policy init: ``model`` (by default the ``warmup`` checkpoint of an SFT run directory given
    as ``model.path``); the reference is a frozen copy of the same params (``ref_dtype`` e.g.
    ``bfloat16`` to hold it in half the memory). Per step: ``batch_questions`` x ``n_samples``
    rollouts, ``ppo_epochs`` passes over them in minibatches of ``mini_batch_size`` sequences
    (0 = the whole batch: ReFT's one optimizer step per PPO epoch). ``max_total_len`` caps
    prompt (padded) + completion as HF's ``max_length``; prompts keep their first
    ``data.max_prompt_len`` tokens (300). ``advantage_estimator`` is a key of
    ``ppo_math.ADVANTAGE_ESTIMATORS`` (gae; grpo and rloo need ``n_samples > 1``).
    """

    run_dir: str
    seed: int = 42
    model: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec(step="warmup"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_ppo_optim)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval: EvalConfig = dataclasses.field(default_factory=_ppo_eval)
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    # schedule
    epochs: int = 300
    batch_questions: int = 32
    n_samples: int = 1
    mini_batch_size: int = 0
    ppo_epochs: int = 2
    # objective
    kl_coef: float = 0.01  # ReFT: 0.01 P-CoT, 0.05 N-CoT
    kl_estimator: str = "k1"
    kl_in_reward: bool = True
    advantage_estimator: str = "gae"
    whiten_advantages: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 5.0
    loss_agg: str = "seq_mean_token_mean"
    value_head_init: str = "torch_default"  # keep the loaded (randomly initialised) head | zeros
    ref_dtype: str | None = None
    sampler_logprobs: bool = False  # ReFT recomputes the old log-probs with a full forward
    # rollout
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_total_len: int = 700
    max_new_tokens: int | None = None  # None: as many as max_total_len allows
    prompt_bucket: int = 32
    length_bucket: int = 64
    score_microbatches: int = 1
    # loop
    eval_at_start: bool = True  # evaluate the initial policy (epoch 0) on a fresh run
    save_every_steps: int = 0
    keep: int = 1
    nan_policy: str = "stop"
    max_steps: int | None = None  # stop this invocation after so many rollout steps (benchmarks)
    profile_sync: bool = False  # block after every phase: exact per-phase times, no overlap

    def validate(self) -> None:
        if not self.run_dir:
            raise config_lib.ConfigError("a run directory is required", key="run_dir", value=self.run_dir)
        for name in ("epochs", "batch_questions", "n_samples", "ppo_epochs", "prompt_bucket",
                     "length_bucket", "score_microbatches", "keep"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))
        rows = self.batch_questions * self.n_samples
        if self.mini_batch_size < 0 or (self.mini_batch_size and rows % self.mini_batch_size):
            raise config_lib.ConfigError(f"must divide batch_questions * n_samples = {rows} (0 = all)",
                                         key="mini_batch_size", value=self.mini_batch_size)
        choices = {"kl_estimator": tuple(ppo_math.KL_ESTIMATORS),
                   "advantage_estimator": tuple(ppo_math.ADVANTAGE_ESTIMATORS),
                   "loss_agg": ppo_math.LOSS_AGGREGATIONS, "value_head_init": VALUE_HEAD_INITS,
                   "nan_policy": NAN_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise config_lib.ConfigError(f"must be one of {allowed}", key=name, value=getattr(self, name))
        if self.advantage_estimator in ("grpo", "rloo") and self.n_samples < 2:
            raise config_lib.ConfigError(f"{self.advantage_estimator} compares samples of one question: "
                                         "needs n_samples >= 2", key="n_samples", value=self.n_samples)
        if self.data.max_prompt_len >= self.max_total_len:
            raise config_lib.ConfigError(f"must be below max_total_len={self.max_total_len}",
                                         key="data.max_prompt_len", value=self.data.max_prompt_len)
        if self.ref_dtype not in (None, "float32", "bfloat16", "float16"):
            raise config_lib.ConfigError("must be float32, bfloat16 or float16", key="ref_dtype",
                                         value=self.ref_dtype)

    @property
    def rows(self) -> int:
        """Sequences per rollout step."""
        return self.batch_questions * self.n_samples

    @property
    def minibatch(self) -> int:
        return self.mini_batch_size or self.rows


def step_config(cfg: PPOConfig, eos_ids: tuple[int, ...]) -> ppo_step.PPOStepConfig:
    """The device-side knobs of a run."""
    return ppo_step.PPOStepConfig(
        eos_ids=eos_ids, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, kl_in_reward=cfg.kl_in_reward,
        estimator=cfg.advantage_estimator, gamma=cfg.gamma, lam=cfg.lam, group_size=cfg.n_samples,
        whiten_advantages=cfg.whiten_advantages, clip=cfg.clip, value_clip=cfg.value_clip,
        vf_coef=cfg.vf_coef, loss_agg=cfg.loss_agg, grad_accum=cfg.optim.grad_accum,
        score_microbatches=cfg.score_microbatches,
        compute_dtype=None if cfg.optim.compute_dtype == "float32" else cfg.optim.compute_dtype,
        sampler_logprobs=cfg.sampler_logprobs)


def sample_config(cfg: PPOConfig, eos_ids: tuple[int, ...], pad_id: int) -> SampleConfig:
    """ReFT's rollout sampler: pure sampling (T 1, no top-k/top-p), 700 tokens in all."""
    return SampleConfig(max_new_tokens=cfg.max_new_tokens or cfg.max_total_len, max_total_len=cfg.max_total_len,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.n_samples,
                        eos_ids=eos_ids, pad_id=pad_id)


def derived_sizes(cfg: PPOConfig, splits: Splits, model_config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    spe = steps_per_epoch(len(splits.train), cfg.batch_questions, drop_last=True)
    per_step = cfg.ppo_epochs * (cfg.rows // cfg.minibatch)
    return {
        "questions": (len(splits.train), f"val {len(splits.val)}, test {len(splits.test)}"),
        "rollout steps/epoch": (spe, f"floor({len(splits.train)} / {cfg.batch_questions} questions)"),
        "sequences/step": (cfg.rows, f"{cfg.batch_questions} questions x {cfg.n_samples} samples"),
        "optimizer steps/step": (per_step, f"{cfg.ppo_epochs} PPO epochs x {cfg.rows // cfg.minibatch} minibatches"
                                           f" of {cfg.minibatch}"),
        "microbatch": (cfg.minibatch // cfg.optim.grad_accum, f"grad_accum {cfg.optim.grad_accum}"),
        "rollout steps": (spe * cfg.epochs, f"{cfg.epochs} epochs"),
        "tokens/sequence": (cfg.max_total_len, f"at most; prompt <= {cfg.data.max_prompt_len}"),
        "mesh": (str(dict(mesh.shape)), f"{mesh.devices.size} devices"),
        "params": (model_config.num_params(), f"{model_config.num_layers} layers, d {model_config.hidden_size}"),
    }


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """What the loop reads; built once by `_setup`."""

    cfg: PPOConfig
    run_dir: pathlib.Path
    mesh: Mesh
    splits: Splits
    model_config: ModelConfig
    tokenizer: Any
    ref_params: Any
    engine: RolloutEngine
    score: Callable  # the jitted score pass (policy log-probs + values, reference log-probs)
    assemble: Callable
    update: Callable | None  # jitted on first use (needs a state to take shardings from)
    update_fn: Callable
    take_rows: Callable
    ckpt: Checkpointer
    writer: MetricsWriter
    best_name: str
    total_updates: int
    steps_per_epoch: int

    def prefixes(self, examples):
        ids = special_ids(self.tokenizer)
        return encode_prefixes(self.tokenizer, [ex.question for ex in examples], self.cfg.data.engine,
                               self.cfg.data.max_prompt_len, ids.pad, self.cfg.prompt_bucket,
                               self.cfg.data.header_newline)


def _check_mesh(cfg: PPOConfig, mesh: Mesh) -> None:
    div = parallel.batch_divisor(mesh)
    if cfg.batch_questions % div:
        raise config_lib.ConfigError(f"must be a multiple of data*fsdp = {div} (the sampler shards prompts)",
                                     key="batch_questions", value=cfg.batch_questions)
    for name, n in (("optim.grad_accum", cfg.optim.grad_accum), ("score_microbatches", cfg.score_microbatches)):
        size = cfg.minibatch if name == "optim.grad_accum" else cfg.rows
        if size % (n * div):
            raise config_lib.ConfigError(f"{size} sequences do not split into {n} blocks of a multiple of "
                                         f"data*fsdp = {div}", key=name, value=n)


def _policy(cfg: PPOConfig, mesh: Mesh, splits: Splits) -> tuple[ModelConfig, Any, Any]:
    corpus = tokenizer_corpus(splits.train, cfg.data.engine) if cfg.model.path is None else None
    return build_policy(cfg.model, mesh, cfg.seed, corpus)


def _setup(cfg: PPOConfig, stack: contextlib.ExitStack) -> tuple[_Run, TrainState, dict]:
    run_dir = pathlib.Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh)
    _check_mesh(cfg, mesh)
    splits = load_examples(cfg.data, cfg.seed)
    if len(splits.train) < cfg.batch_questions:
        raise config_lib.ConfigError(f"only {len(splits.train)} training questions", key="batch_questions",
                                     value=cfg.batch_questions)
    spe = steps_per_epoch(len(splits.train), cfg.batch_questions, drop_last=True)
    total_updates = spe * cfg.epochs * cfg.ppo_epochs * (cfg.rows // cfg.minibatch)
    tx = make_optimizer(cfg.optim, total_updates)
    best_name = f"{cfg.eval.select_on}_accuracy"
    # The reference is always the configured init; the policy is the run's own on resume.
    model_config, init_params, tokenizer = _policy(cfg, mesh, splits)
    ref_params = ppo_step.make_reference(init_params, cfg.ref_dtype)
    ckpt, restored, saved_config, saved_tokenizer = open_run(
        stack, run_dir, cfg.keep, best_name, lambda mc: state_abstract(mc, cfg.optim, total_updates, mesh))
    if saved_config is not None:
        model_config, tokenizer = saved_config, saved_tokenizer
    if restored is None:
        params = ppo_step.zero_value_head(init_params) if cfg.value_head_init == "zeros" else init_params
        state = sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)
        save_run_artifacts(run_dir, model_config, tokenizer, cfg.optim, total_updates, cfg)
        meta: dict = {}
    else:
        state, meta = restored
        drift = config_drift(meta.get("config", {}), config_lib.to_dict(cfg))
        print(f"[ppo] resuming {run_dir} at step {meta['step']} (epoch {meta['epoch'] + 1}, batch "
              f"{meta['batch']})" + ("; config changed: " + "; ".join(drift) if drift else ""), flush=True)
    del init_params

    ids = special_ids(tokenizer)
    eos_ids = tuple(sorted({ids.eos}))
    step_cfg = step_config(cfg, eos_ids)
    executor = None
    if cfg.data.engine == "python":
        from reft_jax.reward.sandbox import ProgramExecutor

        executor = stack.enter_context(ProgramExecutor(cfg.sandbox))
    engine = RolloutEngine(model_config, sample_config(cfg, eos_ids, ids.pad), tokenizer, mesh,
                           answer_kind(cfg.data.dataset), cfg.data.engine, executor, cfg.reward,
                           cfg.length_bucket, keep_sampler_logp=cfg.sampler_logprobs, sync=cfg.profile_sync)
    print(f"[ppo] {run_dir}\n" + config_lib.describe_derived(derived_sizes(cfg, splits, model_config, mesh)),
          flush=True)
    batch_sh = parallel.batch_sharding(mesh, 2)
    run = _Run(cfg, run_dir, mesh, splits, model_config, tokenizer, ref_params, engine,
               score=jax.jit(lambda p, r, ro: ppo_step.score_pass(p, r, ro, model_config, step_cfg)),
               assemble=jax.jit(lambda s, ro, sc: ppo_step.assemble(s, ro, sc, step_cfg)),
               update=None, update_fn=ppo_step.make_ppo_update(model_config, tx, step_cfg),
               take_rows=jax.jit(lambda b, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), b),
                                 out_shardings=batch_sh),
               ckpt=ckpt, writer=stack.enter_context(MetricsWriter(run_dir)), best_name=best_name,
               total_updates=total_updates, steps_per_epoch=spe)
    return run, state, meta


# ----------------------------------------------------------------------------------------------
# One rollout step
# ----------------------------------------------------------------------------------------------
def minibatch_orders(rows: int, minibatch: int, seed: int, step: int, ppo_epochs: int) -> list[list[np.ndarray | None]]:
    """Row indices of every minibatch of every PPO epoch; ``None`` = the whole batch in order
    (one minibatch: the order cannot matter, so no gather)."""
    if minibatch == rows:
        return [[None] for _ in range(ppo_epochs)]
    out = []
    for e in range(ppo_epochs):
        perm = np.random.default_rng([seed, step, e]).permutation(rows).astype(np.int32)
        out.append([perm[i:i + minibatch] for i in range(0, rows, minibatch)])
    return out


def _ppo_updates(run: _Run, state: TrainState, batch: dict, step: int) -> tuple[TrainState, list[dict]]:
    """``ppo_epochs`` x minibatches of the jitted update (dispatched, not waited for)."""
    if run.update is None:
        example = {k: batch[k] for k in ppo_step.BATCH_KEYS}
        run.update = sharded.jit_step(run.update_fn, state, example, run.mesh)
    cfg = run.cfg
    metrics = []
    for order in minibatch_orders(cfg.rows, cfg.minibatch, cfg.seed, step, cfg.ppo_epochs):
        for idx in order:
            mb = batch if idx is None else run.take_rows(batch, jnp.asarray(idx))
            state, m = run.update(state, mb)
            metrics.append(m)
    return state, metrics


def _step_record(stats: dict, updates: list[dict], rewards, timer: Timer, prefixes) -> dict[str, float]:
    """One metrics record from the rollout statistics, the updates and the host-side scores."""
    rec = {k: float(v) for k, v in stats.items()}
    for k in updates[0]:
        rec[k] = float(np.mean([float(u[k]) for u in updates]))
    rec["nonfinite"] = float(sum(int(u["nonfinite"]) for u in updates))
    rec.update({
        "accuracy": float(rewards.correct.mean()),  # reward == 1 (correct) fraction
        "reft_acc": float(rewards.scores.mean()),  # ReFT's logged "acc": mean reward, 0.1s included
        "truncated_prompts": prefixes.truncated,
        **status_counts(rewards.statuses),
    })
    rec.update(timer.summary(reset=True, prefix="time/"))
    return rec


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def _evaluate(run: _Run, params: Any, epoch: int, step: int) -> dict[str, float]:
    """Greedy top-1 with the rollout prefix and ReFT's RL length cap on test and val."""
    from reft_jax.eval import evaluate as ev

    out: dict[str, float] = {}
    start = time.perf_counter()
    for name, rows in (("test", run.splits.test), ("val", run.splits.val)):
        if not rows:
            continue
        rng = jax.random.fold_in(jax.random.key(run.cfg.seed + 1), epoch)
        result = ev.evaluate(params, run.model_config, run.tokenizer, rows, run.cfg.data, run.cfg.eval, rng,
                             run.mesh, run.engine.executor, vote_k=run.cfg.eval.vote_k, prefix="rollout")
        ev.write_predictions(run.run_dir / "eval" / f"epoch{epoch:03d}_{name}.jsonl", result["predictions"])
        out.update({f"{name}_{k}": float(v) for k, v in result["metrics"].items()})
    if out:
        out["seconds"] = time.perf_counter() - start
        run.writer.write(step, {**out, "epoch": epoch}, prefix="eval")
        print(f"[ppo] eval after epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


def _evaluates(run: _Run, epoch: int | None) -> bool:
    """Evaluation after this (1-based) epoch: every ``every_epochs`` and after the last
    (``None``: whether there is anything to evaluate at all)."""
    has_rows = bool(run.splits.test or run.splits.val)
    return has_rows and (epoch is None or epoch % run.cfg.eval.every_epochs == 0 or epoch == run.cfg.epochs)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run_ppo(cfg: PPOConfig, *, _after_step: Callable[[int, TrainState], TrainState | None] | None = None
            ) -> dict[str, Any]:
    """Train (or continue training) ``cfg.run_dir``; returns a summary of this invocation.

    ``_after_step(step, state)`` is a test hook called after each rollout step (before its
    metrics are checked and its checkpoint saved); it may return a replacement state (to poison
    it) or raise (to simulate a crash).
    """
    cfg.validate()
    with contextlib.ExitStack() as stack:
        run, state, meta = _setup(cfg, stack)
        summary = _train(run, state, meta, stack, _after_step)
    plot_metrics(run.run_dir)
    return summary


class _Batches:
    """Question batches of each epoch (a pure function of ``(seed, epoch)``), drop-last."""

    def __init__(self, train: list, batch_questions: int, seed: int):
        self.train, self.q, self.seed = train, batch_questions, seed
        self.per_epoch = steps_per_epoch(len(train), batch_questions, drop_last=True)
        self._epoch, self._order = None, None

    def __call__(self, epoch: int, bi: int) -> list:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_batches(len(self.train), self.q, self.seed, epoch, drop_last=True)
        return [self.train[i] for i in self._order[bi]]


def _rollout_step(run: _Run, state: TrainState, step: int, examples: list, prefixes, timer: Timer,
                  prepare_next: Callable[[], Any]) -> tuple[TrainState, dict[str, float], Any]:
    """Rollout, score, assemble, update: (new state, metrics record, the next batch's prefixes).

    ``prepare_next`` (host work) runs after the updates are dispatched and before the host
    waits for them, so it overlaps the device.
    """
    start = time.perf_counter()
    key = jax.random.fold_in(state.rng, step)
    ro = run.engine.run(state.params, prefixes, examples, key, timer,
                        on_device=lambda b: run.score(state.params, run.ref_params, b))
    batch, scored, rewards = ro.batch, ro.device, ro.rewards
    with timer("update") as span:
        ppo_batch, stats = run.assemble(scored, batch, scores_on_mesh(rewards.scores, run.mesh))
        state, updates = _ppo_updates(run, state, ppo_batch, step)
        with timer("prepare_next"):
            nxt = prepare_next()
        stats, updates = span.block(jax.device_get((stats, updates)))
    rec = _step_record(stats, updates, rewards, timer, prefixes)
    rec["sequences_per_s"] = run.cfg.rows / max(time.perf_counter() - start, 1e-9)
    return state, rec, nxt


def _diverged(run: _Run, what: str, step: int, epoch: int, bi: int, saved: int | None) -> None:
    where = (f"the last good checkpoint is step {saved} in {run.ckpt.directory}" if saved is not None
             else "no checkpoint was saved yet")
    raise TrainingDiverged(
        f"{what} step {step} (epoch {epoch + 1}, batch {bi + 1}/{run.steps_per_epoch}); the run stopped "
        f"without saving it: {where}. Lower optim.lr or raise kl_coef, or set nan_policy=skip.")


def _train(run: _Run, state: TrainState, meta: dict, stack: contextlib.ExitStack,
           after_step: Callable | None) -> dict[str, Any]:
    cfg = run.cfg
    batches = _Batches(run.splits.train, cfg.batch_questions, cfg.seed)
    n_batches = batches.per_epoch
    epoch0, batch0, step = meta.get("epoch", 0), meta.get("batch", 0), meta.get("step", 0)
    best, last_eval = meta.get("best"), dict(meta.get("eval") or {})
    history = list(meta.get("history") or [])
    saved = meta.get("step")
    if not meta and cfg.eval_at_start and _evaluates(run, None):
        last_eval = _evaluate(run, state.params, 0, 0)
        history.append({"epoch": 0, **last_eval})
    positions = [(e, b) for e in range(epoch0, cfg.epochs) for b in range(batch0 if e == epoch0 else 0, n_batches)]
    if cfg.max_steps is not None:
        positions = positions[:cfg.max_steps]
    bar = stack.enter_context(progress(total=step + len(positions), initial=step, desc="ppo", unit="step"))
    timer, last = Timer(), {}
    prefixes = None
    for i, (epoch, bi) in enumerate(positions):
        examples = batches(epoch, bi)
        if prefixes is None:
            with timer("prefixes"):
                prefixes = run.prefixes(examples)
        nxt_pos = positions[i + 1] if i + 1 < len(positions) else None
        state, rec, prefixes = _rollout_step(
            run, state, step, examples, prefixes, timer,
            lambda: run.prefixes(batches(*nxt_pos)) if nxt_pos is not None else None)
        step += 1
        if after_step is not None:
            state = after_step(step, state) or state
        rec.update(epoch=epoch + (bi + 1) / n_batches, lr=float(cfg.optim.lr))
        run.writer.write(step, rec, prefix="train")
        if rec["nonfinite"] and cfg.nan_policy == "stop":
            _diverged(run, f"non-finite PPO loss or gradient (loss {rec['loss']}, grad norm {rec['grad_norm']}) "
                           "at", step, epoch, bi, saved)
        last = rec
        bar.update(1)
        bar.set_postfix(reward=f"{rec['score_mean']:.3f}", acc=f"{rec['accuracy']:.3f}",
                        kl=f"{rec['kl_seq_mean']:.3f}", refresh=False)
        end = bi == n_batches - 1
        if not end and not (cfg.save_every_steps and step % cfg.save_every_steps == 0):
            continue
        metric = None
        if end and _evaluates(run, epoch + 1):
            last_eval = _evaluate(run, state.params, epoch + 1, step)
            history.append({"epoch": epoch + 1, **last_eval})
            metric = last_eval.get(run.best_name)
            if metric is not None and (best is None or improves(metric, best["value"])):
                best = {"name": run.best_name, "value": metric, "epoch": epoch + 1, "step": step}
        if not bool(all_finite(state.params)):  # a finite loss does not prove finite params
            _diverged(run, "non-finite params after", step, epoch, bi, saved)
        meta = {"step": step, "epoch": epoch + 1 if end else epoch, "batch": 0 if end else bi + 1,
                "epoch_end": epoch + 1 if end else None, "best": best, "eval": last_eval,
                "history": history, "config": config_lib.to_dict(cfg)}
        run.ckpt.save(step, state, meta, metric=metric)
        saved = step
    run.ckpt.wait()
    return {"run_dir": str(run.run_dir), "step": step, "epochs_done": meta.get("epoch", epoch0),
            "train": last, "eval": last_eval, "best": best, "history": history}
