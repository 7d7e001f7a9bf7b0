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
from reft_jax.eval import inference
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer, improves
from reft_jax.data.batches import bucket_length, epoch_batches, pad_sft_batch, steps_per_epoch
from reft_jax.data.prompts import encode_sft, special_ids, sft_target
from reft_jax.data.sources import DataError, Example
from reft_jax.distributed import process_batch_slice
from reft_jax.metrics import MetricsWriter, plot_metrics, progress
from reft_jax.model.config import ModelConfig
from reft_jax.parallel import MeshConfig
from reft_jax.reward.answers import answer_kind
from reft_jax.reward.reward import RewardConfig
from reft_jax.reward.sandbox import SandboxConfig
from reft_jax.rollout.sampler import SampleConfig
from reft_jax.train import sharded
from reft_jax.train.run import DataConfig, EvalConfig, ModelSpec, build_policy, save_run_artifacts, state_abstract
from reft_jax.train.sft import SFTConfig, run_sft
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
    from reft_jax.parallel import build_mesh

    data = cfg.sft.data
    if cfg.samples is not None:
        return inference.load_sample_sets(cfg.samples, data, "train", stack, cfg.sft.eval.timeout)
    path = pathlib.Path(cfg.sft.run_dir) / "selftrain_samples.jsonl"
    if path.exists():
        return inference.read_sample_file(path)
    mesh = build_mesh(cfg.sft.mesh)
    model_config, params, tokenizer = build_policy(cfg.warmup, mesh, cfg.sft.seed)
    executor = None
    if data.engine == "python":
        from reft_jax.reward.sandbox import ProgramExecutor

        executor = stack.enter_context(ProgramExecutor(SandboxConfig(timeout=cfg.sft.eval.timeout)))
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
    from reft_jax.data.splits import load_examples

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
    from reft_jax.checkpoint import SELFTRAIN_MARKER

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
                   grad_accum: int = 1, compute_dtype: str | None = None
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
                                            "loss_weights": mb["sample_weights"]}, config)
                g_nll, _ = sequence_nll(p, {"tokens": mb["gold_tokens"], "attention_mask": mb["gold_mask"],
                                            "loss_weights": mb["gold_weights"]}, config)
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
def _online_optim() -> OptimConfig:
    return OptimConfig(lr=3e-7, schedule="constant", warmup_ratio=0.0)


def _online_eval() -> EvalConfig:
    return EvalConfig(max_new_tokens=700, max_total_len=700)


@dataclasses.dataclass
class OnlineConfig:
    """One OnSL run; defaults are ReFT's (§8.2, §8b): the warm-up checkpoint, 32 questions x 1
    sample per step, 2 updates per step, lr 3e-7 constant, prompts <= 300 and 700 tokens in all,
    greedy test evaluation after every epoch with the best checkpoint kept."""

    run_dir: str
    seed: int = 42
    model: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec(step="warmup"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_online_optim)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval: EvalConfig = dataclasses.field(default_factory=_online_eval)
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    epochs: int = 300
    batch_questions: int = 32
    n_samples: int = 1
    updates_per_step: int = 2  # ReFT's ppo_epochs, each over the whole batch
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_total_len: int = 700
    max_new_tokens: int | None = None
    gold_max_len: int = 300  # ReFT truncates the gold SFT rows at max_input_length (300)
    prompt_bucket: int = 32
    length_bucket: int = 64
    keep: int = 1
    max_steps: int | None = None  # stop this invocation after so many rollout steps

    def validate(self) -> None:
        if not self.run_dir:
            raise config_lib.ConfigError("a run directory is required", key="run_dir", value=self.run_dir)
        for name in ("epochs", "batch_questions", "n_samples", "updates_per_step", "gold_max_len",
                     "prompt_bucket", "length_bucket", "keep"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))
        if self.data.max_prompt_len >= self.max_total_len:
            raise config_lib.ConfigError(f"must be below max_total_len={self.max_total_len}",
                                         key="data.max_prompt_len", value=self.data.max_prompt_len)


@dataclasses.dataclass
class _Online:
    """What the loop reads; built once."""

    cfg: OnlineConfig
    run_dir: pathlib.Path
    mesh: Any
    splits: Any
    model_config: ModelConfig
    tokenizer: Any
    sample_config: SampleConfig
    executor: Any
    step_fn: Callable | None
    make_step: Callable
    ckpt: Checkpointer
    writer: MetricsWriter
    best_name: str


def _setup_online(cfg: OnlineConfig, stack: contextlib.ExitStack) -> tuple[_Online, TrainState, dict]:
    from reft_jax.parallel import build_mesh
    from reft_jax.data.splits import load_examples, tokenizer_corpus
    from reft_jax.train.run import open_run

    run_dir = pathlib.Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh)
    div = parallel.batch_divisor(mesh) * cfg.optim.grad_accum  # both parts split over both
    if cfg.batch_questions % div:
        raise config_lib.ConfigError(f"must be a multiple of data*fsdp*grad_accum = {div}", key="batch_questions",
                                     value=cfg.batch_questions)
    splits = load_examples(cfg.data, cfg.seed)
    if len(splits.train) < cfg.batch_questions:
        raise config_lib.ConfigError(f"only {len(splits.train)} training questions", key="batch_questions",
                                     value=cfg.batch_questions)
    total = steps_per_epoch(len(splits.train), cfg.batch_questions, drop_last=True) * cfg.epochs * cfg.updates_per_step
    tx = make_optimizer(cfg.optim, total)
    best_name = f"{cfg.eval.select_on}_accuracy"
    ckpt, restored, model_config, tokenizer = open_run(
        stack, run_dir, cfg.keep, best_name, lambda mc: state_abstract(mc, cfg.optim, total, mesh))
    if restored is None:
        corpus = tokenizer_corpus(splits.train, cfg.data.engine) if cfg.model.path is None else None
        model_config, params, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
        state = sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)
        save_run_artifacts(run_dir, model_config, tokenizer, cfg.optim, total, cfg)
        _mark(cfg.run_dir, "online", policy=cfg.model.path, step=cfg.model.step)
        meta: dict = {}
    else:
        state, meta = restored
    ids = special_ids(tokenizer)
    sample_cfg = SampleConfig(max_new_tokens=cfg.max_new_tokens or cfg.max_total_len, max_total_len=cfg.max_total_len,
                              temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.n_samples,
                              eos_ids=(ids.eos,), pad_id=ids.pad)
    executor = None
    if cfg.data.engine == "python":
        from reft_jax.reward.sandbox import ProgramExecutor

        executor = stack.enter_context(ProgramExecutor(cfg.sandbox))
    compute = None if cfg.optim.compute_dtype == "float32" else cfg.optim.compute_dtype
    make_step = make_onsl_step(model_config, tx, make_schedule(cfg.optim, total), cfg.optim.grad_accum, compute)
    print(f"[selftrain online] {run_dir}\n" + config_lib.describe_derived({
        "questions": (len(splits.train), f"test {len(splits.test)}"),
        "steps/epoch": (total // cfg.epochs // cfg.updates_per_step, f"floor({len(splits.train)} / "
                                                                      f"{cfg.batch_questions} questions)"),
        "updates": (total, f"{cfg.epochs} epochs x {cfg.updates_per_step} per step"),
        "sequences/step": (cfg.batch_questions * cfg.n_samples, f"+ {cfg.batch_questions} gold rows"),
    }), flush=True)
    run = _Online(cfg, run_dir, mesh, splits, model_config, tokenizer, sample_cfg, executor, None, make_step, ckpt,
                  stack.enter_context(MetricsWriter(run_dir)), best_name)
    return run, state, meta


def onsl_batch(run: _Online, examples: Sequence[Example], key: jax.Array, params: Any
               ) -> tuple[dict[str, np.ndarray], Any]:
    """One rollout (ReFT's, via the PPO rollout pieces) and the gold rows: the host batch and
    the rewards."""
    from reft_jax.rollout import sampler as sampling
    from reft_jax.rollout.engine import decode_texts, encode_prefixes, score_rollouts, trim_rollout

    cfg, tok, sc = run.cfg, run.tokenizer, run.sample_config
    prefixes = encode_prefixes(tok, [ex.question for ex in examples], cfg.data.engine, cfg.data.max_prompt_len,
                               sc.pad_id, cfg.prompt_bucket, cfg.data.header_newline)
    out = sampling.sample(params, prefixes.tokens, prefixes.mask, key, run.model_config, sc, mesh=run.mesh)
    tokens, mask, logprobs = jax.device_get((out.tokens, out.mask, out.logprobs))
    P = prefixes.tokens.shape[1]
    host = trim_rollout(tokens, mask, logprobs, P, cfg.length_bucket, sc.eos_ids[0], sc.pad_id)
    rows = [ex for ex in examples for _ in range(sc.n)]
    rewards = score_rollouts(decode_texts(tok, host["tokens"], host["attention_mask"]), rows,
                             answer_kind(cfg.data.dataset), cfg.data.engine, run.executor, cfg.reward)
    gold = [encode_sft(tok, ex, cfg.data.engine, cfg.gold_max_len) for ex in examples]
    width = bucket_length(max(len(g.ids) for g in gold), cfg.length_bucket, cfg.gold_max_len)
    padded = pad_sft_batch(gold, width, sc.pad_id, len(gold))
    unit = np.zeros((len(gold),), np.float32)
    unit[0] = 1.0
    batch = {"sample_tokens": host["tokens"], "sample_mask": host["attention_mask"],
             "sample_weights": sample_weights(host["attention_mask"], P, rewards.correct),
             "gold_tokens": padded["tokens"], "gold_mask": padded["attention_mask"],
             "gold_weights": padded["loss_weights"], "unit": unit}
    return batch, rewards


def _local(batch: dict[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    """This process's rows of each part (the two parts have different row counts)."""
    return parallel.shard_batch({k: v[process_batch_slice(len(v), mesh)] for k, v in batch.items()}, mesh)


def _evaluate_online(run: _Online, params: Any, epoch: int, step: int) -> dict[str, float]:
    """Greedy top-1 on the test split with the rollout prefix and the RL length cap."""
    from reft_jax.eval import evaluate as ev

    if not run.splits.test:
        return {}
    rng = jax.random.fold_in(jax.random.key(run.cfg.seed + 1), epoch)
    result = ev.evaluate(params, run.model_config, run.tokenizer, run.splits.test, run.cfg.data, run.cfg.eval, rng,
                         run.mesh, run.executor, vote_k=run.cfg.eval.vote_k, prefix="rollout")
    ev.write_predictions(run.run_dir / "eval" / f"epoch{epoch:03d}_test.jsonl", result["predictions"])
    out = {f"test_{k}": float(v) for k, v in result["metrics"].items()}
    run.writer.write(step, {**out, "epoch": epoch}, prefix="eval")
    print(f"[selftrain online] eval after epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()),
          flush=True)
    return out


def run_online(cfg: OnlineConfig) -> dict[str, Any]:
    """Train (or continue, from the last epoch-end checkpoint) an OnSL run."""
    cfg.validate()
    with contextlib.ExitStack() as stack:
        run, state, meta = _setup_online(cfg, stack)
        summary = _online_loop(run, state, meta, stack)
    plot_metrics(run.run_dir)
    return summary


def _online_loop(run: _Online, state: TrainState, meta: dict, stack: contextlib.ExitStack) -> dict[str, Any]:
    cfg = run.cfg
    train = run.splits.train
    per_epoch = steps_per_epoch(len(train), cfg.batch_questions, drop_last=True)
    step, best, last_eval = meta.get("step", 0), meta.get("best"), dict(meta.get("eval") or {})
    positions = [(e, b) for e in range(meta.get("epoch", 0), cfg.epochs) for b in range(per_epoch)]
    positions = positions[:cfg.max_steps] if cfg.max_steps is not None else positions
    bar = stack.enter_context(progress(total=per_epoch * cfg.epochs, initial=step, desc="onsl", unit="step"))
    last: dict[str, float] = {}
    order: list = []
    for epoch, bi in positions:
        if bi == 0 or not order:
            order = epoch_batches(len(train), cfg.batch_questions, cfg.seed, epoch, drop_last=True)
        examples = [train[i] for i in order[bi]]
        start = time.perf_counter()
        host, rewards = onsl_batch(run, examples, jax.random.fold_in(state.rng, step), state.params)
        batch = _local(host, run.mesh)
        if run.step_fn is None:
            run.step_fn = sharded.jit_step(run.make_step, state, batch, run.mesh)
        updates = []
        for _ in range(cfg.updates_per_step):
            state, m = run.step_fn(state, batch)
            updates.append(m)
        updates = jax.device_get(updates)
        step += 1
        last = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]}
        last.update(accuracy=float(rewards.correct.mean()), mean_reward=float(rewards.scores.mean()),
                    epoch=epoch + (bi + 1) / per_epoch, seconds=time.perf_counter() - start)
        if not np.isfinite(last["loss"]):
            raise FloatingPointError(f"non-finite OnSL loss at step {step}; lower optim.lr")
        run.writer.write(step, last, prefix="train")
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}", refresh=False)
        if bi != per_epoch - 1:
            continue
        metric = None
        if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.epochs:
            last_eval = _evaluate_online(run, state.params, epoch + 1, step)
            metric = last_eval.get(run.best_name)
            if metric is not None and (best is None or improves(metric, best["value"])):
                best = {"name": run.best_name, "value": metric, "epoch": epoch + 1, "step": step}
        run.ckpt.save(step, state, {"step": step, "epoch": epoch + 1, "batch": 0, "epoch_end": epoch + 1,
                                    "best": best, "eval": last_eval, "config": config_lib.to_dict(cfg)},
                      metric=metric)
    run.ckpt.wait()
    return {"run_dir": str(run.run_dir), "step": step, "train": last, "eval": last_eval, "best": best}


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

