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
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.data.batches import bucket_sizes
from reft_jax.data.prompts import special_ids
from reft_jax.data.splits import Splits, load_examples, tokenizer_corpus
from reft_jax.metrics import Timer, plot_metrics
from reft_jax.model.config import ModelConfig
from reft_jax.reward.answers import answer_kind
from reft_jax.reward.reward import RewardConfig
from reft_jax.reward.sandbox import SandboxConfig
from reft_jax.rollout.engine import RolloutConfig, RolloutEngine, encode_prefixes, scores_on_mesh, status_counts
from reft_jax.train import loop, ppo_step, sharded
from reft_jax.train.ppo_step import PPOAlgoConfig
from reft_jax.train.loop import TrainingDiverged
from reft_jax.train.run import (EvalConfig, ModelSpec, RunConfig, build_policy, compute_dtype, from_warmup,
                                fit_questions, open_or_start, plan_memory, rl_eval, rl_optim)
from reft_jax.train.sft import eval_executor, evaluate_splits
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer

__all__ = ["PPOConfig", "TrainingDiverged", "run_ppo", "derived_sizes"]


@dataclasses.dataclass
class PPOConfig(PPOAlgoConfig, RolloutConfig, RunConfig):
    """One ReFT PPO run: the run section (`RunConfig`), the rollout section shared with online
    self-training (`RolloutConfig`) and ReFT's objective (`ppo_step.PPOAlgoConfig`, which the
    step functions receive whole), flat in YAML. Defaults are the paper's recipe (§5, §8b).

    Policy init: ``model`` (by default the ``warmup`` checkpoint of an SFT run directory given
    as ``model.path``); the reference is a frozen copy of the same params. Per step:
    ``batch_questions`` x ``n_samples`` rollouts, ``ppo_epochs`` passes over them in minibatches
    of ``mini_batch_size`` sequences; prompts keep their first ``data.max_prompt_len`` tokens.
    """

    model: ModelSpec = dataclasses.field(default_factory=from_warmup)
    optim: OptimConfig = dataclasses.field(default_factory=rl_optim)
    eval: EvalConfig = dataclasses.field(default_factory=rl_eval)
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    epochs: int = 300
    eval_at_start: bool = True  # evaluate the initial policy (epoch 0) on a fresh run
    max_steps: int | None = None  # stop this invocation after so many rollout steps (benchmarks)
    profile_sync: bool = False  # block after every phase: exact per-phase times, no overlap

    def validate(self) -> None:
        self.validate_run()
        self.validate_rollout(self.data.max_prompt_len)
        self.validate_algo()
        if self.epochs < 1:
            raise config_lib.ConfigError("must be >= 1", key="epochs", value=self.epochs)
        rows = self.rows
        if self.mini_batch_size < 0 or (self.mini_batch_size and rows % self.mini_batch_size):
            raise config_lib.ConfigError(f"must divide batch_questions * n_samples = {rows} (0 = all)",
                                         key="mini_batch_size", value=self.mini_batch_size)
        if self.advantage_estimator in ("grpo", "rloo") and self.n_samples < 2:
            raise config_lib.ConfigError(f"{self.advantage_estimator} compares samples of one question: "
                                         "needs n_samples >= 2", key="n_samples", value=self.n_samples)

    @property
    def minibatch(self) -> int:
        return self.mini_batch_size or self.rows


def derived_sizes(cfg: PPOConfig, splits: Splits, model_config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    spe = cfg.rollout_steps(len(splits.train))
    per_step = cfg.ppo_epochs * (cfg.rows // cfg.minibatch)
    return {
        "questions": (len(splits.train), f"val {len(splits.val)}, test {len(splits.test)}"),
        "rollout steps/epoch": (spe, f"{len(splits.train)} / {cfg.batch_questions} questions, last batch: "
                                     f"{cfg.last_batch}"),
        "sequences/step": (cfg.rows, f"{cfg.batch_questions} questions x {cfg.n_samples} samples"),
        "optimizer steps/step": (per_step, f"{cfg.ppo_epochs} PPO epochs x {cfg.rows // cfg.minibatch} minibatches"
                                           f" of {cfg.minibatch}"),
        "microbatch": (cfg.minibatch // cfg.optim.grad_accum, f"grad_accum {cfg.optim.grad_accum}"),
        "rollout steps": (spe * cfg.epochs, f"{cfg.epochs} epochs"),
        "tokens/sequence": (cfg.max_total_len, f"at most; prompt <= {cfg.data.max_prompt_len}"),
        "prompt widths": (str(bucket_sizes(cfg.prompt_bucket, cfg.data.max_prompt_len)), "the shape buckets"),
        "completion widths": (str(bucket_sizes(cfg.length_bucket, cfg.max_new_tokens or cfg.max_total_len)),
                              "each program compiles once per bucket"),
        "mesh": (str(dict(mesh.shape)), f"{mesh.devices.size} devices"),
        "params": (model_config.num_params(), f"{model_config.num_layers} layers, d {model_config.hidden_size}"),
    }


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


# ----------------------------------------------------------------------------------------------
# The trainer: rollout, score, assemble, update
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


@dataclasses.dataclass
class PPOTrainer(loop.Trainer):
    """PPO's own parts: question batches (in the ``(seed, epoch)`` order), the
    rollout step, and greedy evaluation from the rollout prefix."""

    cfg: PPOConfig | None = None
    splits: Splits | None = None
    ref_params: Any = None
    engine: RolloutEngine | None = None
    score: Callable | None = None  # the jitted score pass (policy log-probs + values, reference log-probs)
    assemble: Callable | None = None
    update_fn: Callable | None = None
    update: Callable | None = None  # jitted on first use (needs a state to take shardings from)
    take_rows: Callable | None = None
    eval_executor: Any = None  # P-CoT evaluation runs programs with eval.timeout, as SFT's
    timer: Timer = dataclasses.field(default_factory=Timer)
    _order: tuple[int, list] | None = None
    _prefixes: Any = None

    def questions(self, epoch: int, bi: int) -> list:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.cfg.question_batches(len(self.splits.train), self.cfg.seed, epoch))
        return [self.splits.train[i] for i in self._order[1][bi]]

    def prefixes(self, examples):
        ids = special_ids(self.run.tokenizer)
        return encode_prefixes(self.run.tokenizer, [ex.question for ex in examples], self.cfg.data.engine,
                               self.cfg.data.max_prompt_len, ids.pad, self.cfg.prompt_bucket,
                               self.cfg.data.header_newline)

    def updates(self, state: TrainState, batch: dict, step: int) -> tuple[TrainState, list[dict]]:
        """``ppo_epochs`` x minibatches of the jitted update (dispatched, not waited for)."""
        if self.update is None:
            self.update = sharded.jit_step(self.update_fn, state, {k: batch[k] for k in ppo_step.BATCH_KEYS},
                                           self.run.mesh)
        cfg, metrics = self.cfg, []
        for order in minibatch_orders(cfg.rows, cfg.minibatch, cfg.seed, step, cfg.ppo_epochs):
            for idx in order:
                mb = batch if idx is None else self.take_rows(batch, jnp.asarray(idx))
                state, m = self.update(state, mb)
                metrics.append(m)
        return state, metrics

    def step(self, state, step, epoch, bi, upcoming):
        """Rollout, score, assemble, update. The next batch's prefixes are encoded after the
        updates are dispatched and before the host waits for them, so they overlap the device."""
        start, timer = time.perf_counter(), self.timer
        examples = self.questions(epoch, bi)
        if self._prefixes is None:
            with timer("prefixes"):
                self._prefixes = self.prefixes(examples)
        prefixes = self._prefixes
        key = jax.random.fold_in(state.rng, step)
        ro = self.engine.run(state.params, prefixes, examples, key, timer,
                             on_device=lambda b: self.score(state.params, self.ref_params, b))
        with timer("update") as span:
            batch, stats = self.assemble(ro.device, ro.batch, scores_on_mesh(ro.rewards.scores, self.run.mesh))
            state, updates = self.updates(state, batch, step)
            with timer("prepare_next"):
                self._prefixes = self.prefixes(self.questions(*upcoming)) if upcoming is not None else None
            stats, updates = span.block(jax.device_get((stats, updates)))
        rec = {k: float(v) for k, v in stats.items()}
        for k in updates[0]:
            rec[k] = float(np.mean([float(u[k]) for u in updates]))
        rec["nonfinite"] = float(sum(int(u["nonfinite"]) for u in updates))
        rec.update({
            "accuracy": float(ro.rewards.correct.mean()),  # reward == 1 (correct) fraction
            "reft_acc": float(ro.rewards.scores.mean()),  # ReFT's logged "acc": mean reward, 0.1s included
            "truncated_prompts": prefixes.truncated,
            **status_counts(ro.rewards.statuses),
        })
        rec.update(timer.summary(reset=True, prefix="time/"))
        rec["sequences_per_s"] = self.cfg.rows / max(time.perf_counter() - start, 1e-9)
        rec["prompt_width"], rec["seq_width"] = prefixes.tokens.shape[1], ro.batch["tokens"].shape[1]
        return state, rec

    def record(self, m, epoch, bi, seconds):
        return {**m, "epoch": epoch + (bi + 1) / self.steps_per_epoch, "lr": float(self.cfg.optim.lr)}

    def postfix(self, rec):
        return {"reward": f"{rec['score_mean']:.3f}", "acc": f"{rec['accuracy']:.3f}", "kl": f"{rec['kl_seq_mean']:.3f}"}

    def has_eval(self) -> bool:
        return bool(self.splits.test or self.splits.val)

    def evaluate(self, params, epoch, step):
        """Greedy top-1 with the rollout prefix and ReFT's RL length cap on test and val."""
        return evaluate_splits(params, self.run, self.splits, epoch, self.cfg.seed + 1, self.eval_executor,
                               "rollout")


def total_updates(cfg: PPOConfig, questions: int) -> int:
    """Optimizer steps of the whole run: the LR schedule's length."""
    return cfg.rollout_steps(questions) * cfg.epochs * cfg.ppo_epochs * (cfg.rows // cfg.minibatch)


def run_ppo(cfg: PPOConfig, *, _after_step: Callable[[int, TrainState], TrainState | None] | None = None
            ) -> dict[str, Any]:
    """Train (or continue training) ``cfg.run_dir``; returns a summary of this invocation.
    ``_after_step(step, state)``: the loop's test hook (poison the state, or raise)."""
    cfg.validate()
    with contextlib.ExitStack() as stack:
        mesh = parallel.build_mesh(cfg.mesh)
        splits = load_examples(cfg.data, cfg.seed)
        if len(splits.train) < cfg.batch_questions:
            raise config_lib.ConfigError(f"only {len(splits.train)} training questions", key="batch_questions",
                                         value=cfg.batch_questions)
        # sized before the prompts are fitted: only this optimizer's state structure is used
        planned = total_updates(cfg, len(splits.train))
        tx = make_optimizer(cfg.optim, planned)
        # The reference is always the configured init; the policy is the run's own on resume.
        corpus = tokenizer_corpus(splits.train, cfg.data.engine) if cfg.model.path is None else None
        model_config, init_params, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
        ref_params = ppo_step.make_reference(init_params, cfg.ref_dtype)

        def fresh():
            params = ppo_step.zero_value_head(init_params) if cfg.value_head_init == "zeros" else init_params
            return model_config, tokenizer, sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)

        run, state, meta = open_or_start(cfg, "ppo", stack, mesh, planned, f"{cfg.eval.select_on}_accuracy",
                                         fresh)
        init_params = None  # the state and the reference hold what they need
        splits = fit_questions(run, splits)
        spe = cfg.rollout_steps(len(splits.train))
        tx = make_optimizer(cfg.optim, total_updates(cfg, len(splits.train)))  # the schedule spans what trains
        plan_memory(run, "ppo", batch=cfg.minibatch, seq_len=cfg.max_total_len, rollout_rows=cfg.rows,
                    prompt_len=cfg.data.max_prompt_len, ref_dtype=cfg.ref_dtype)
        _check_mesh(cfg, mesh)
        ids = special_ids(run.tokenizer)
        eos_ids, dtype, chunk = tuple(sorted({ids.eos})), compute_dtype(cfg.optim), cfg.model.logprob_chunk
        executor = None
        if cfg.data.engine == "python":
            from reft_jax.reward.sandbox import ProgramExecutor

            executor = stack.enter_context(ProgramExecutor(cfg.sandbox))
        engine = RolloutEngine(run.model_config, cfg.sample_config(eos_ids, ids.pad), run.tokenizer, mesh,
                               answer_kind(cfg.data.dataset), cfg.data.engine, executor, cfg.reward,
                               cfg.length_bucket, keep_sampler_logp=cfg.sampler_logprobs, sync=cfg.profile_sync)
        print(f"[ppo] {run.run_dir}\n" + config_lib.describe_derived(
            derived_sizes(cfg, splits, run.model_config, mesh)), flush=True)
        mc = run.model_config
        trainer = PPOTrainer(
            name="ppo", run=run, steps_per_epoch=spe, last_epoch=cfg.epochs,
            best_name=f"{cfg.eval.select_on}_accuracy", eval_at_start=cfg.eval_at_start, max_steps=cfg.max_steps,
            loss_is_nll=False, cfg=cfg, splits=splits, ref_params=ref_params, engine=engine,
            score=jax.jit(lambda p, r, ro: ppo_step.score_pass(p, r, ro, mc, cfg, eos_ids=eos_ids,
                                                               compute_dtype=dtype, chunk=chunk)),
            assemble=jax.jit(lambda s, ro, sc: ppo_step.assemble(s, ro, sc, cfg, eos_ids=eos_ids,
                                                                 group_size=cfg.n_samples)),
            update_fn=ppo_step.make_ppo_update(mc, tx, cfg, grad_accum=cfg.optim.grad_accum, compute_dtype=dtype,
                                               chunk=chunk),
            eval_executor=eval_executor(cfg, stack) if splits.test or splits.val else None,
            take_rows=jax.jit(lambda b, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), b),
                              out_shardings=parallel.batch_sharding(mesh, 2)))
        _, summary = loop.train(trainer, state, meta, stack, _after_step)
    plot_metrics(run.run_dir)
    return summary
