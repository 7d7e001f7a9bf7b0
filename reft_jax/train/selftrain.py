"""The self-training baselines of ReFT (reference §8): offline ("OffSL") and online ("OnSL").

Offline (`train_sl_model.py`): the warm-up checkpoint samples k completions per *train* question
(ReFT: 100, temperature 1, top-k 50, 1024 tokens); each question keeps its first `per_question`
(10) unique correct samples (stripped, sample order) plus its gold CoT if not among them; these
rows are added to the original training set (where the gold appears once more: "gold twice")
and the *base* model is fine-tuned with the SFT recipe: `run_sft(cfg.sft, extra_train=rows)`.

Online (`train_rl_sl.py`): ReFT's rollout (same prefixes, pure sampling, 700 tokens, same
reward) from the warm-up checkpoint, but the update is supervised: per step, `updates_per_step`
(2) optimizer steps on `0.5 * CE(samples with reward 1) + 0.5 * CE(gold CoTs of the same
questions)`, each a token mean, the sample half dropped (the gold half still x 0.5) when no
sample is correct; no value head, reference model or KL; lr 3e-7 constant. ReFT takes the means
per GPU and averages gradients over GPUs; here both are token means over the global batch (the
same when every device holds the same number of tokens), exact under gradient accumulation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.checkpoint import SELFTRAIN_MARKER
from reft_jax.data.batches import bucket_length, pad_sft_batch
from reft_jax.data.formats import DataError, Example
from reft_jax.data.prompts import encode_sft, special_ids, sft_target
from reft_jax.data.splits import load_examples, tokenizer_corpus
from reft_jax.distributed import process_batch_slice
from reft_jax.eval import inference
from reft_jax.metrics import Timer, plot_metrics
from reft_jax.model.config import ModelConfig
from reft_jax.reward.answers import answer_kind
from reft_jax.reward.reward import RewardConfig
from reft_jax.reward.sandbox import SandboxConfig
from reft_jax.rollout.engine import RolloutConfig, RolloutEngine, encode_prefixes
from reft_jax.rollout.sampler import SampleConfig
from reft_jax.train import loop, sharded
from reft_jax.train.run import (EvalConfig, ModelSpec, RunConfig, build_policy, compute_dtype, from_warmup,
                                fit_questions, open_or_start, plan_memory, rl_eval, rl_optim)
from reft_jax.train.sft import SFTConfig, evaluate_splits, eval_executor, run_sft
from reft_jax.train.sft_step import sequence_nll
from reft_jax.train.state import (OptimConfig, TrainState, accumulate_gradients, apply_gradients,
                                   cast_for_compute, make_optimizer, make_schedule, split_microbatches)

MODES = ("offline", "online")


# ----------------------------------------------------------------------------------------------
# Offline self-training
# ----------------------------------------------------------------------------------------------
def offline_rows(sets: Sequence[inference.SampleSet], train: Mapping[str, Example], engine: str,
                 per_question: int = 10, where: str = "samples") -> list[Example]:
    """The sampling file's training rows, exactly as `train_sl_model.py` builds them: per
    question, the correct completions stripped and deduplicated (first occurrence), the first
    `per_question` of them, then the gold CoT (N-CoT: with the answer line) unless already
    there. Each row's `answer_cot` is its complete target (to be encoded verbatim)."""
    rows = []
    for s in sets:
        gold = train.get(s.item_id)
        if gold is None:
            raise DataError(f"{s.item_id!r} is not a training question: offline self-training samples must "
                            "come from the train split", where, None, "item_id")
        kept: list[str] = []
        for text, ok in zip(s.completions, s.correct):
            text = text.strip()
            if ok and text not in kept:
                kept.append(text)
        targets = kept[:per_question]
        if gold.answer_cot is not None and sft_target(gold, engine) not in targets:
            targets.append(sft_target(gold, engine))
        rows += [Example(s.item_id, s.question, s.answer_value, t) for t in targets]
    return rows


@dataclasses.dataclass
class OfflineConfig:
    """Offline self-training: `sft` is the SFT recipe from the *base* model (ReFT: 20 epochs,
    no warm-up copy); `samples` an existing sample file of the train split (`reft sample`),
    else `warmup` samples `k` per question here (saved in the run directory, reused on resume)."""

    sft: SFTConfig
    samples: str | None = None
    warmup: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec(step="warmup"))
    k: int = 100
    per_question: int = 10  # ReFT's self_learning_samples
    temperature: float = 1.0
    top_k: int = 50  # HF's generate default, which ReFT's sampling.py ran with
    max_total_len: int = 1024
    max_new_tokens: int = 1024
    sample_batch_size: int = 2  # questions per sampling batch (each with k rows)

    def validate(self) -> None:
        for name in ("k", "per_question", "max_new_tokens", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))
        if self.samples is None and self.warmup.path is None:
            raise config_lib.ConfigError("give a sample file, or warmup.path to sample from", key="samples",
                                         value=None)


def _offline_samples(cfg: OfflineConfig, train: list[Example], stack: contextlib.ExitStack
                     ) -> list[inference.SampleSet]:
    """The train-split samples: from `cfg.samples`, or drawn from the warm-up checkpoint now."""
    data = cfg.sft.data
    if cfg.samples is not None:
        return inference.load_sample_sets(cfg.samples, data, "train", stack, cfg.sft.eval.timeout)
    path = pathlib.Path(cfg.sft.run_dir) / "selftrain_samples.jsonl"
    if path.exists():
        return inference.read_sample_file(path)
    mesh = parallel.build_mesh(cfg.sft.mesh)
    model_config, params, tokenizer = build_policy(cfg.warmup, mesh, cfg.sft.seed)
    executor = eval_executor(cfg.sft, stack)
    sample_cfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, max_total_len=cfg.max_total_len,
                              temperature=cfg.temperature, top_k=cfg.top_k, n=cfg.k)
    sets = inference.sample_sets(params, model_config, tokenizer, train, data, sample_cfg,
                                 jax.random.key(cfg.sft.seed), mesh, executor, cfg.sample_batch_size,
                                 prefix="rollout", show_progress=True)
    if jax.process_index() == 0:
        inference.write_sample_file(path, sets)
    return sets


def run_offline(cfg: OfflineConfig) -> dict[str, Any]:
    """Sample (or read) the warm-up's train samples, build the rows, run the SFT recipe."""

    cfg.validate()
    cfg.sft.validate()
    train = load_examples(cfg.sft.data, cfg.sft.seed).train
    with contextlib.ExitStack() as stack:
        sets = _offline_samples(cfg, train, stack)
    rows = offline_rows(sets, {ex.item_id: ex for ex in train}, cfg.sft.data.engine, cfg.per_question,
                        cfg.samples or "samples")
    print(f"[selftrain offline] {len(train)} gold rows + {len(rows)} rows from {len(sets)} sampled questions "
          f"(<= {cfg.per_question} unique correct samples each, plus the gold CoT)", flush=True)
    _mark(cfg.sft.run_dir, "offline", samples=cfg.samples or str(pathlib.Path(cfg.sft.run_dir) /
                                                                  "selftrain_samples.jsonl"), rows=len(rows))
    summary = run_sft(cfg.sft, extra_train=rows)
    return {**summary, "selftrain_rows": len(rows)}


def _mark(run_dir: str, mode: str, **info: Any) -> None:
    """`selftrain.json`: tells `reft report` (and a reader) which baseline the run is."""

    if jax.process_index() == 0:
        path = pathlib.Path(run_dir) / SELFTRAIN_MARKER
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"mode": mode, **info}, indent=2))


# ----------------------------------------------------------------------------------------------
# Online self-training: the pure step
# ----------------------------------------------------------------------------------------------
def sample_weights(attention_mask: np.ndarray, prompt_width: int, correct: np.ndarray) -> np.ndarray:
    """Per-token loss weights [R, L] of rollout rows `[left-padded prompt (P) | completion]`:
    position t predicts t+1, so t is weighted when t+1 is a real completion token (the EOS
    included, pads not) and the row is correct."""
    w = np.zeros(attention_mask.shape, np.float32)
    w[:, prompt_width - 1:-1] = attention_mask[:, prompt_width:]
    return w * np.asarray(correct, np.float32)[:, None]


def make_onsl_step(config: ModelConfig, tx: optax.GradientTransformation, schedule: Callable,
                   grad_accum: int = 1, compute_dtype: str | None = None, chunk: int | None = 128
                   ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`: one update on
    `0.5 * CE(sample tokens) + 0.5 * CE(gold tokens)`, each a token mean over the whole batch.

    batch: `sample_tokens / sample_mask / sample_weights [R, L]` (left-padded rollouts, weights
    0 on incorrect rows), `gold_tokens / gold_mask / gold_weights [Q, G]` (right-padded SFT
    rows) and `unit [Q]` (1 on row 0 only: it makes the accumulated normaliser exactly 1, since
    both means are taken with the whole batch's token counts inside each micro-batch)."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        n_sample = batch["sample_weights"].sum()
        n_gold = batch["gold_weights"].sum()

        def loss_and_grad(params, mb):
            def loss(p):
                p = cast_for_compute(p, compute_dtype) if compute_dtype else p
                s_nll, _ = sequence_nll(p, {"tokens": mb["sample_tokens"], "attention_mask": mb["sample_mask"],
                                            "loss_weights": mb["sample_weights"]}, config, chunk)
                g_nll, _ = sequence_nll(p, {"tokens": mb["gold_tokens"], "attention_mask": mb["gold_mask"],
                                            "loss_weights": mb["gold_weights"]}, config, chunk)
                # no correct sample: s_nll is 0 and only the gold half (still x 0.5) remains
                return 0.5 * s_nll / jnp.maximum(n_sample, 1.0) + 0.5 * g_nll / jnp.maximum(n_gold, 1.0)

            value, grads = jax.value_and_grad(loss)(params)
            return value, mb["unit"].sum(), grads

        value, grads = accumulate_gradients(loss_and_grad, state.params, split_microbatches(batch, grad_accum))
        metrics = {"loss": value, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                   "sample_tokens": n_sample, "gold_tokens": n_gold}
        return apply_gradients(state, grads, tx), metrics

    return step


# ----------------------------------------------------------------------------------------------
# Online self-training: the run
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OnlineConfig(RolloutConfig, RunConfig):
    """One OnSL run; defaults are ReFT's (§8.2, §8b): the warm-up checkpoint, 32 questions x 1
    sample per step, 2 updates per step, lr 3e-7 constant, prompts <= 300 and 700 tokens in all,
    greedy test evaluation after every epoch with the best checkpoint kept."""

    model: ModelSpec = dataclasses.field(default_factory=from_warmup)
    optim: OptimConfig = dataclasses.field(default_factory=rl_optim)
    eval: EvalConfig = dataclasses.field(default_factory=rl_eval)
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    epochs: int = 300
    updates_per_step: int = 2  # ReFT's ppo_epochs, each over the whole batch
    gold_max_len: int = 300  # ReFT truncates the gold SFT rows at max_input_length (300)
    max_steps: int | None = None  # stop this invocation after so many rollout steps

    def validate(self) -> None:
        self.validate_run()
        self.validate_rollout(self.data.max_prompt_len)
        for name in ("epochs", "updates_per_step", "gold_max_len"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))


@dataclasses.dataclass
class OnlineTrainer(loop.Trainer):
    """OnSL's own parts: ReFT's rollout (the PPO rollout engine) plus the gold rows of the same
    questions, and `updates_per_step` supervised updates on them."""

    cfg: OnlineConfig | None = None
    splits: Any = None
    rollout: RolloutEngine | None = None
    eval_executor: Any = None  # P-CoT evaluation runs programs with eval.timeout, as SFT's
    make_step: Callable | None = None
    step_fn: Callable | None = None
    timer: Timer = dataclasses.field(default_factory=Timer)
    _order: tuple[int, list] | None = None

    def onsl_batch(self, examples: Sequence[Example], key: jax.Array, params: Any
                   ) -> tuple[dict[str, np.ndarray], Any]:
        """One rollout and the gold rows: the host batch and the rewards."""
        cfg, tok, sc = self.cfg, self.run.tokenizer, self.rollout.sample_config
        prefixes = encode_prefixes(tok, [ex.question for ex in examples], cfg.data.engine, cfg.data.max_prompt_len,
                                   sc.pad_id, cfg.prompt_bucket, cfg.data.header_newline)
        ro = self.rollout.run(params, prefixes, examples, key, self.timer)
        host, width = ro.host, prefixes.tokens.shape[1]
        gold = [encode_sft(tok, ex, cfg.data.engine, cfg.gold_max_len) for ex in examples]
        padded = pad_sft_batch(gold, bucket_length(max(len(g.ids) for g in gold), cfg.length_bucket, cfg.gold_max_len),
                               sc.pad_id, len(gold))
        unit = np.zeros((len(gold),), np.float32)
        unit[0] = 1.0
        batch = {"sample_tokens": host["tokens"], "sample_mask": host["attention_mask"],
                 "sample_weights": sample_weights(host["attention_mask"], width, ro.rewards.correct),
                 "gold_tokens": padded["tokens"], "gold_mask": padded["attention_mask"],
                 "gold_weights": padded["loss_weights"], "unit": unit}
        return batch, ro.rewards

    def step(self, state, step, epoch, bi, upcoming):
        cfg, train = self.cfg, self.splits.train
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, cfg.question_batches(len(train), cfg.seed, epoch))
        examples = [train[i] for i in self._order[1][bi]]
        start = time.perf_counter()
        host, rewards = self.onsl_batch(examples, jax.random.fold_in(state.rng, step), state.params)
        # this process's rows of each part (the two parts have different row counts)
        batch = parallel.shard_batch({k: v[process_batch_slice(len(v), self.run.mesh)] for k, v in host.items()},
                                     self.run.mesh)
        if self.step_fn is None:
            self.step_fn = sharded.jit_step(self.make_step, state, batch, self.run.mesh)
        updates = []
        for _ in range(cfg.updates_per_step):
            state, m = self.step_fn(state, batch)
            updates.append(m)
        updates = jax.device_get(updates)
        self.timer.summary(reset=True)
        rec = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]}
        rec["nonfinite"] = float(sum(int(u["nonfinite"]) for u in updates))
        rec.update(accuracy=float(rewards.correct.mean()), mean_reward=float(rewards.scores.mean()),
                   seconds=time.perf_counter() - start)
        return state, rec

    def postfix(self, rec):
        return {"loss": f"{rec['loss']:.4f}", "acc": f"{rec['accuracy']:.3f}"}

    def has_eval(self) -> bool:
        return bool(self.splits.test or self.splits.val)

    def evaluate(self, params, epoch, step):
        """Greedy top-1 with the rollout prefix and the RL length cap."""
        return evaluate_splits(params, self.run, self.splits, epoch, self.cfg.seed + 1, self.eval_executor,
                               "rollout")


def run_online(cfg: OnlineConfig) -> dict[str, Any]:
    """Train (or continue) an OnSL run."""
    cfg.validate()
    with contextlib.ExitStack() as stack:
        mesh = parallel.build_mesh(cfg.mesh)
        div = parallel.batch_divisor(mesh) * cfg.optim.grad_accum  # both parts split over both
        if cfg.batch_questions % div:
            raise config_lib.ConfigError(f"must be a multiple of data*fsdp*grad_accum = {div}",
                                         key="batch_questions", value=cfg.batch_questions)
        splits = load_examples(cfg.data, cfg.seed)
        if len(splits.train) < cfg.batch_questions:
            raise config_lib.ConfigError(f"only {len(splits.train)} training questions", key="batch_questions",
                                         value=cfg.batch_questions)
        # sized before the prompts are fitted: only this optimizer's state structure is used
        total = cfg.rollout_steps(len(splits.train)) * cfg.epochs * cfg.updates_per_step
        tx = make_optimizer(cfg.optim, total)

        def fresh():
            corpus = tokenizer_corpus(splits.train, cfg.data.engine) if cfg.model.path is None else None
            model_config, params, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
            return model_config, tokenizer, sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)

        run, state, meta = open_or_start(cfg, "selftrain online", stack, mesh, total,
                                         f"{cfg.eval.select_on}_accuracy", fresh,
                                         on_fresh=lambda: _mark(cfg.run_dir, "online", policy=cfg.model.path,
                                                                step=cfg.model.step))
        splits = fit_questions(run, splits)
        spe = cfg.rollout_steps(len(splits.train))
        total = spe * cfg.epochs * cfg.updates_per_step  # the schedule spans the questions that train
        tx = make_optimizer(cfg.optim, total)
        ids = special_ids(run.tokenizer)
        sample_cfg = cfg.sample_config((ids.eos,), ids.pad)
        executor = None
        if cfg.data.engine == "python":
            from reft_jax.reward.sandbox import ProgramExecutor

            executor = stack.enter_context(ProgramExecutor(cfg.sandbox))
        engine = RolloutEngine(run.model_config, sample_cfg, run.tokenizer, mesh, answer_kind(cfg.data.dataset),
                               cfg.data.engine, executor, cfg.reward, cfg.length_bucket)
        print(f"[selftrain online] {run.run_dir}\n" + config_lib.describe_derived({
            "questions": (len(splits.train), f"test {len(splits.test)}"),
            "steps/epoch": (spe, f"{len(splits.train)} / {cfg.batch_questions} questions, last batch: "
                                 f"{cfg.last_batch}"),
            "updates": (total, f"{cfg.epochs} epochs x {cfg.updates_per_step} per step"),
            "sequences/step": (cfg.batch_questions * cfg.n_samples, f"+ {cfg.batch_questions} gold rows"),
        }), flush=True)
        plan_memory(run, "sft", batch=cfg.rows + cfg.batch_questions, seq_len=cfg.max_total_len)
        make_step = loop.keep_finite(make_onsl_step(run.model_config, tx, make_schedule(cfg.optim, total),
                                                    cfg.optim.grad_accum, compute_dtype(cfg.optim),
                                                    cfg.model.logprob_chunk))
        trainer = OnlineTrainer(name="onsl", run=run, steps_per_epoch=spe, last_epoch=cfg.epochs,
                                best_name=f"{cfg.eval.select_on}_accuracy", max_steps=cfg.max_steps,
                                cfg=cfg, splits=splits, rollout=engine, make_step=make_step,
                                eval_executor=eval_executor(cfg, stack) if splits.test or splits.val else None)
        _, summary = loop.train(trainer, state, meta, stack)
    plot_metrics(run.run_dir)
    return summary


# ----------------------------------------------------------------------------------------------
# Both, as one config file
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SelfTrainConfig:
    """One file for both baselines (`reft selftrain --mode offline|online`); a mode needs its
    section. Overrides name the section: `online.epochs=1`."""

    offline: OfflineConfig | None = None
    online: OnlineConfig | None = None


def run_selftrain(cfg: SelfTrainConfig, mode: str) -> dict[str, Any]:
    """Run the `mode` section of `cfg`."""
    if mode not in MODES:
        raise config_lib.ConfigError(f"must be one of {MODES}", key="mode", value=mode)
    section = getattr(cfg, mode)
    if section is None:
        raise config_lib.ConfigError(f"the config has no `{mode}:` section", key=mode, value=None)
    return run_offline(section) if mode == "offline" else run_online(section)

