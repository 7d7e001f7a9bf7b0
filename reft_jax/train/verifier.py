"""The verifier: ReFT's reward-model reranker (reference §7.4, `train_reward_model.py`).

Model: the policy's Flax backbone (its params minus the value head) with a 2-class, bias-free
linear head (init N(0, 0.02), HF's `AutoModelForSequenceClassification` score layer) on the
final normed hidden state at the *last non-pad token* of a right-padded row. Params are
`{"backbone": <policy params without value_head>, "head": {"kernel": [D, 2]}}`: the backbone
keeps the policy's layout and shardings, so any policy checkpoint (best SFT, best ReFT) starts
a verifier.

Data: the input is `INSTRUCTION + q + COT_TRIGGER + completion` tokenised as ONE string (as
ReFT does here, unlike SFT), head kept at 700 tokens, no EOS; the label is the completion's
correctness. Training pairs are the per-question unique completions of train-set samples (from
the warm-up checkpoint); loss: 2-class softmax cross-entropy; lr 1e-6 with 10% linear warm-up,
3 epochs, batch 24. Reranking then picks, among each test question's unique completions with a
valid prediction, the most probably correct one (`inference.rerank_pick`).

The run directory is a normal reft run (config, model_config.json, tokenizer, checkpoints of the
TrainState, metrics) plus `verifier.json`, which marks it as a verifier so that a policy loader
never mistakes it for a policy and `load_verifier` refuses anything else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax.eval import inference
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer, abstract_like, improves
from reft_jax.data.batches import Encoded, bucket_length, epoch_batches, pad_sft_batch, steps_per_epoch
from reft_jax.data.prompts import COT_TRIGGER, INSTRUCTION, needs_bos, special_ids, tokenize
from reft_jax.distributed import process_batch_slice
from reft_jax.metrics import MetricsWriter, plot_metrics, progress
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.parallel import MeshConfig
from reft_jax.reward.answers import answer_kind
from reft_jax.train import sharded
from reft_jax.train.run import DataConfig, ModelSpec, build_policy, save_run_artifacts, state_abstract
from reft_jax.train.state import (OptimConfig, TrainState, accumulate_gradients, apply_gradients,
                                   cast_for_compute, make_optimizer, make_schedule, split_microbatches)

HEAD_INIT_STD = 0.02  # HF's initializer_range for the score layer
MARKER = "verifier.json"


class VerifierError(ValueError):
    """A verifier that cannot be used as asked (wrong directory, tokenizer mismatch)."""


# ----------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------
def backbone_params(policy_params: dict) -> dict:
    """The policy's params without its value head (the verifier has its own head)."""
    return {k: v for k, v in policy_params.items() if k != "value_head"}


def init_head(rng: jax.Array, hidden_size: int, dtype: Any = jnp.float32) -> dict:
    """The bias-free 2-class score layer, N(0, 0.02)."""
    return {"kernel": (HEAD_INIT_STD * jax.random.normal(rng, (hidden_size, 2), jnp.float32)).astype(dtype)}


def param_axes(config: ModelConfig) -> dict:
    """Logical axes of the verifier's params (the backbone's are the policy's)."""
    return {"backbone": backbone_params(llama.logical_axes(config)), "head": {"kernel": ("embed", None)}}


def param_shapes(config: ModelConfig) -> dict:
    head = jax.ShapeDtypeStruct((config.hidden_size, 2), jnp.dtype(config.param_dtype))
    return {"backbone": backbone_params(llama.param_shapes(config)), "head": {"kernel": head}}


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    return parallel.logical_to_sharding(param_axes(config), param_shapes(config), mesh)


def init_params(policy_params: dict, config: ModelConfig, rng: jax.Array, mesh: Mesh) -> dict:
    """Verifier params from a policy's (placed) params: its backbone plus a fresh head."""
    head = init_head(rng, config.hidden_size, jnp.dtype(config.param_dtype))
    head = jax.device_put(head, param_shardings(config, mesh)["head"])
    return {"backbone": backbone_params(policy_params), "head": head}


# ----------------------------------------------------------------------------------------------
# The model and the train step (pure)
# ----------------------------------------------------------------------------------------------
def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last real token (right padding; 0 for an all-padding dummy row)."""
    t = jnp.arange(mask.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), t, 0), axis=1)


def verifier_logits(params: dict, tokens: jax.Array, mask: jax.Array, config: ModelConfig) -> jax.Array:
    """float32 logits [B, 2] from the final hidden state at the last non-pad token."""
    hidden = llama.forward_hidden(params["backbone"], tokens, llama.positions_from_mask(mask), mask, config)
    last = jnp.take_along_axis(hidden, last_token_index(mask)[:, None, None], axis=1)[:, 0]  # [B, D]
    return last @ params["head"]["kernel"].astype(jnp.float32)


def positive_probs(params: dict, tokens: jax.Array, mask: jax.Array, config: ModelConfig) -> jax.Array:
    """P(label = 1), i.e. P(correct), per row [B]."""
    return jax.nn.softmax(verifier_logits(params, tokens, mask, config), axis=-1)[:, 1]


def make_verifier_step(config: ModelConfig, tx: optax.GradientTransformation, schedule: Callable,
                       grad_accum: int = 1, compute_dtype: str | None = None
                       ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)` with batch `tokens, attention_mask [B, T]`,
    `labels int32 [B]`, `weights f32 [B]` (0 for the padding rows of a short last batch).
    The loss is the weighted mean 2-class cross-entropy over the whole batch (exact under
    gradient accumulation); the head stays float32 under a bf16 compute dtype."""

    def loss_and_grad(params, mb):
        def loss_sum(p):
            p = cast_for_compute(p, compute_dtype, keep_f32=("head",)) if compute_dtype else p
            logits = verifier_logits(p, mb["tokens"], mb["attention_mask"], config)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["labels"])
            hits = (jnp.argmax(logits, axis=-1) == mb["labels"]) * mb["weights"]
            return (ce * mb["weights"]).sum(), (mb["weights"].sum(), hits.sum())

        (loss, (count, hits)), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
        return loss, count, hits, grads

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, grads, hits = accumulate_gradients(loss_and_grad, state.params,
                                                 split_microbatches(batch, grad_accum), has_aux=True)
        metrics = {"loss": loss, "accuracy": hits.sum() / jnp.maximum(batch["weights"].sum(), 1.0),
                   "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        return apply_gradients(state, grads, tx), metrics

    return step


# ----------------------------------------------------------------------------------------------
# Data (host)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pair:
    """One verifier example: a unique completion of a question, labelled by its correctness."""

    set_index: int  # which sample set (question)
    sample_index: int  # first occurrence of this completion in the set
    question: str
    completion: str
    label: int


def unique_pairs(sets: Sequence[inference.SampleSet]) -> list[Pair]:
    """Every question's unique completions (first occurrence, sample order), valid or not."""
    return [Pair(si, i, s.question, s.completions[i], int(s.correct[i]))
            for si, s in enumerate(sets) for i in inference.unique_indices(s.completions)]


def encode_verifier(tokenizer: Any, question: str, completion: str, max_len: int = 700) -> np.ndarray:
    """Token ids of `INSTRUCTION + q.strip() + COT_TRIGGER + completion` as one string (BOS only
    for the families that need it), head kept, no EOS."""
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    ids = bos + tokenize(tokenizer, INSTRUCTION + question.strip() + COT_TRIGGER + completion)
    return np.asarray(ids[:max_len], np.int32)


def make_batch(encoded: Sequence[np.ndarray], labels: Sequence[int], indices: Sequence[int], batch_size: int,
               bucket: int, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded classification batch of `batch_size` rows (dummy rows weigh 0), its
    length the longest row rounded up to `bucket` (few compiled shapes)."""
    items = [Encoded(encoded[i], len(encoded[i])) for i in indices]
    length = bucket_length(max(len(it.ids) for it in items), bucket, max_len)
    padded = pad_sft_batch(items, length, pad_id, batch_size)
    out_labels = np.zeros((batch_size,), np.int32)
    out_labels[:len(indices)] = [labels[i] for i in indices]
    return {"tokens": padded["tokens"], "attention_mask": padded["attention_mask"], "labels": out_labels,
            "weights": padded["attention_mask"].any(axis=1).astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# Scoring with a verifier
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Verifier:
    """A verifier ready to score: params on `mesh` and its own tokenizer."""

    model_config: ModelConfig
    params: dict
    tokenizer: Any
    mesh: Mesh
    max_len: int = 700
    bucket: int = 64
    _probs: Callable | None = None

    def __post_init__(self) -> None:
        if self._probs is None:
            mc = self.model_config
            self._probs = jax.jit(lambda p, t, m: positive_probs(p, t, m, mc))

    def with_params(self, params: dict) -> "Verifier":
        """The same verifier (and compiled scorer) with other params (training-time evals)."""
        return dataclasses.replace(self, params=params)

    def score(self, questions: Sequence[str], completions: Sequence[str], batch_size: int = 24) -> np.ndarray:
        """P(correct) of each (question, completion), float32 [N]."""
        encoded = [encode_verifier(self.tokenizer, q, c, self.max_len) for q, c in zip(questions, completions)]
        if not encoded:
            return np.zeros((0,), np.float32)
        div = parallel.batch_divisor(self.mesh)
        batch_size = -(-batch_size // div) * div
        rows = process_batch_slice(batch_size, self.mesh)
        pad = special_ids(self.tokenizer).pad
        out = []
        for start in range(0, len(encoded), batch_size):
            idx = list(range(start, min(start + batch_size, len(encoded))))
            batch = make_batch(encoded, [0] * len(encoded), idx, batch_size, self.bucket, self.max_len, pad)
            local = {k: batch[k][rows] for k in ("tokens", "attention_mask")}
            on_mesh = parallel.shard_batch(local, self.mesh)
            probs = self._probs(self.params, on_mesh["tokens"], on_mesh["attention_mask"])
            out.append(_host(probs)[:len(idx)])
        return np.concatenate(out).astype(np.float32)


def _host(x: jax.Array) -> np.ndarray:
    """A batch-sharded result as one host array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def rerank(verifier: Verifier, sets: Sequence[inference.SampleSet], kind: str, batch_size: int = 24
           ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score every unique completion, rerank each question, and summarise: rerank@k, vote@k,
    pass@k (any correct, the upper bound), pass@1 and `cls_accuracy` (argmax of the 2-class head
    against the labels over all unique completions, ReFT's cls_acc). Returns (metrics, one
    record per question with the pick)."""
    pairs = unique_pairs(sets)
    probs = verifier.score([p.question for p in pairs], [p.completion for p in pairs], batch_size)
    per_set: list[dict[int, float]] = [{} for _ in sets]
    for pair, prob in zip(pairs, probs):
        per_set[pair.set_index][pair.sample_index] = float(prob)
    metrics = inference.summarize(sets, kind, per_set)
    metrics["cls_accuracy"] = float(np.mean([(prob > 0.5) == bool(p.label) for p, prob in zip(pairs, probs)])) \
        if pairs else 0.0
    records = []
    for s, p in zip(sets, per_set):
        pick = inference.rerank_pick(inference.rerank_candidates(s, kind), p)
        records.append({"item_id": s.item_id, "answer_value": s.answer_value, "pick": pick,
                        "completion": None if pick is None else s.completions[pick],
                        "prediction": None if pick is None else s.predictions[pick],
                        "correct": pick is not None and s.correct[pick],
                        "prob": None if pick is None else p[pick]})
    return metrics, records


def evaluate_rerank(params: Any, model_config: ModelConfig, tokenizer: Any, examples: Sequence[Any], data_cfg: Any,
                    eval_cfg: Any, k: int, rng: jax.Array, mesh: Mesh, verifier_dir: str, verifier_step: str = "best",
                    executor: Any = None, prefix: str = "sft", batch_size: int = 24
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """rerank@k of a policy (`reft eval --strategy rerank`): k samples per question drawn as
    for voting (`evaluate.sample_configs`), reranked by the verifier in `verifier_dir`, whose
    tokenizer must be the policy's. Returns (metrics incl. vote@k and pass@k, per-question picks)."""
    from reft_jax.eval import evaluate as ev

    verifier = load_verifier(verifier_dir, mesh, verifier_step)
    check_policy_tokenizer(verifier, tokenizer, str(verifier_dir))
    _, vote_cfg = ev.sample_configs(eval_cfg, k)
    sets = inference.sample_sets(params, model_config, tokenizer, examples, data_cfg, vote_cfg, rng, mesh,
                                 executor, eval_cfg.batch_size, prefix=prefix, show_progress=True)
    return rerank(verifier, sets, answer_kind(data_cfg.dataset), batch_size)


def check_policy_tokenizer(verifier: Verifier, policy_tokenizer: Any, where: str) -> None:
    """The verifier must read the policy's texts with the policy's vocabulary: a backbone sized
    for another tokenizer, or another tokenizer, would score garbage without failing."""
    n_policy = len(policy_tokenizer)
    if verifier.model_config.vocab_size < n_policy:
        raise VerifierError(f"{where}: the verifier's backbone has vocab size {verifier.model_config.vocab_size}, "
                            f"but the policy tokenizer has {n_policy} tokens: it was not built from this policy")
    mine, theirs = verifier.tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise VerifierError(f"{where}: the verifier's tokenizer ({len(mine)} tokens) differs from the policy's "
                            f"({len(theirs)} tokens), e.g. {diff}: train the verifier from this policy")


def load_verifier(run_dir: str | pathlib.Path, mesh: Mesh, step: str = "latest", batch_bucket: int = 64) -> Verifier:
    """A trained verifier from its run directory (`step`: latest | best | <int>)."""
    from reft_jax.model.tokenizer_io import load_tokenizer
    from reft_jax.checkpoint import checkpoint_step

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / MARKER).is_file():
        raise VerifierError(f"{run_dir}: not a verifier run directory (no {MARKER}; "
                            "train one with `reft rerank train`)")
    info = json.loads((run_dir / MARKER).read_text())
    if step == "best" and not info.get("best_metric"):
        raise VerifierError(f"{run_dir}: trained without eval_samples, so no checkpoint is 'best'; ask for 'latest'")
    model_config = ModelConfig(**json.loads((run_dir / "model_config.json").read_text()))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    if len(tokenizer) > model_config.vocab_size:
        raise VerifierError(f"{run_dir}: its tokenizer has {len(tokenizer)} tokens but the backbone only "
                            f"{model_config.vocab_size} embeddings")
    spec = json.loads((run_dir / "state_spec.json").read_text())
    optim = OptimConfig(**spec["optim"])
    with Checkpointer(run_dir / "checkpoints", keep=None, best_metric=info.get("best_metric")) as ckpt:
        chosen = checkpoint_step(ckpt, step)
        restored = ckpt.restore(_state_abstract(model_config, optim, spec["total_steps"], mesh), step=chosen)
    if restored is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to restore")
    return Verifier(model_config, restored[0].params, tokenizer, mesh, info["max_len"], batch_bucket)


def _state_abstract(model_config: ModelConfig, optim: OptimConfig, total_steps: int, mesh: Mesh) -> Any:
    p_abs = abstract_like(param_shapes(model_config), param_shardings(model_config, mesh))
    return state_abstract(model_config, optim, total_steps, mesh, params_abstract=p_abs)


# ----------------------------------------------------------------------------------------------
# Training run
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class VerifierConfig:
    """One verifier run. Defaults are ReFT's Rerank recipe (batch 24, lr 1e-6, 10% warm-up,
    3 epochs, 700 tokens)."""

    run_dir: str
    train_samples: str  # JSONL of train-set samples (from the warm-up checkpoint, `reft sample`)
    eval_samples: str | None = None  # JSONL of test-set samples from the policy being reranked
    seed: int = 42
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)  # the policy it starts from
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # kind + question/gold lookup
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-6))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    epochs: int = 3
    batch_size: int = 24
    max_len: int = 700
    bucket: int = 64
    eval_every_steps: int = 1000  # and after every epoch (ReFT)
    eval_batch_size: int = 24
    keep: int = 1  # latest checkpoints kept (plus the best by rerank accuracy)
    timeout: float = 10.0  # seconds per program when a sample file must be scored (P-CoT)

    def validate(self) -> None:
        for name in ("run_dir", "train_samples"):
            if not getattr(self, name):
                raise config_lib.ConfigError("required", key=name, value=getattr(self, name))
        for name in ("epochs", "batch_size", "max_len", "bucket", "eval_every_steps", "eval_batch_size", "keep"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))


def _eval_record(verifier: Verifier, sets, kind: str, cfg: VerifierConfig, epoch: float) -> dict[str, float]:
    metrics, _ = rerank(verifier, sets, kind, cfg.eval_batch_size)
    return {**{k: v for k, v in metrics.items() if k != "num_questions"}, "epoch": epoch}


def train_verifier(cfg: VerifierConfig) -> dict[str, Any]:
    """Train (or continue, at epoch granularity) the verifier of `cfg.run_dir`."""
    from reft_jax.parallel import build_mesh, check_batch
    from reft_jax.train.run import open_run

    cfg.validate()
    run_dir = pathlib.Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh)
    check_batch(cfg.batch_size, cfg.optim.grad_accum, mesh)
    kind = answer_kind(cfg.data.dataset)
    with contextlib.ExitStack() as stack:
        train_sets = inference.load_sample_sets(cfg.train_samples, cfg.data, "train", stack, cfg.timeout)
        eval_sets = (inference.load_sample_sets(cfg.eval_samples, cfg.data, "test", stack, cfg.timeout)
                     if cfg.eval_samples else [])
        pairs = unique_pairs(train_sets)
        k = max((len(s.completions) for s in eval_sets), default=0)
        best_name = f"rerank@{k}_accuracy" if eval_sets else None
        spe = steps_per_epoch(len(pairs), cfg.batch_size)
        total_steps = spe * cfg.epochs
        tx = make_optimizer(cfg.optim, total_steps)
        ckpt, restored, model_config, tokenizer = open_run(
            stack, run_dir, cfg.keep, best_name, lambda mc: _state_abstract(mc, cfg.optim, total_steps, mesh))
        if restored is None:
            corpus = [INSTRUCTION + p.question + COT_TRIGGER + p.completion for p in pairs] \
                if cfg.model.path is None else None
            model_config, policy, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
            if tokenizer is None:
                raise VerifierError(f"{cfg.model.path}: the policy has no tokenizer")
            params = init_params(policy, model_config, jax.random.fold_in(jax.random.key(cfg.seed), 1), mesh)
            state = sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)
            save_run_artifacts(run_dir, model_config, tokenizer, cfg.optim, total_steps, cfg)
            if jax.process_index() == 0:
                (run_dir / MARKER).write_text(json.dumps({"max_len": cfg.max_len, "best_metric": best_name,
                                                          "policy": cfg.model.path, "step": cfg.model.step}))
            meta: dict = {}
        else:
            state, meta = restored
        encoded = [encode_verifier(tokenizer, p.question, p.completion, cfg.max_len) for p in pairs]
        labels = [p.label for p in pairs]
        pad = special_ids(tokenizer).pad
        batch = lambda idx: make_batch(encoded, labels, idx, cfg.batch_size, cfg.bucket, cfg.max_len, pad)  # noqa: E731
        compute = None if cfg.optim.compute_dtype == "float32" else cfg.optim.compute_dtype
        step_fn = sharded.jit_step(make_verifier_step(model_config, tx, make_schedule(cfg.optim, total_steps),
                                                      cfg.optim.grad_accum, compute), state, batch([0]), mesh)
        verifier = Verifier(model_config, state.params, tokenizer, mesh, cfg.max_len, cfg.bucket)
        writer = stack.enter_context(MetricsWriter(run_dir))
        print(f"[verifier] {run_dir}\n" + config_lib.describe_derived({
            "pairs": (len(pairs), f"unique completions of {len(train_sets)} train questions, "
                                  f"{sum(labels)} correct"),
            "steps/epoch": (spe, f"ceil({len(pairs)} / batch {cfg.batch_size})"),
            "total steps": (total_steps, f"{cfg.epochs} epochs"),
            "eval": (len(eval_sets), f"test questions, k = {k}"),
        }), flush=True)
        summary = _loop(cfg, state, meta, step_fn, batch, len(encoded), verifier, eval_sets, kind, best_name,
                        ckpt, writer, mesh, stack)
    plot_metrics(run_dir)
    return summary


def _loop(cfg, state, meta, step_fn, batch, n, verifier, eval_sets, kind, best_name, ckpt, writer, mesh,
          stack) -> dict[str, Any]:
    """The epoch loop (thin): steps, periodic evaluation, a checkpoint per epoch."""
    rows = process_batch_slice(cfg.batch_size, mesh)
    step, best, last = meta.get("step", 0), meta.get("best"), meta.get("eval") or {}
    n_batches = steps_per_epoch(n, cfg.batch_size)
    bar = stack.enter_context(progress(total=n_batches * cfg.epochs, initial=step, desc="verifier", unit="step"))

    def evaluate(epoch: float) -> dict:
        nonlocal best
        record = _eval_record(verifier.with_params(state.params), eval_sets, kind, cfg, epoch)
        writer.write(step, record, prefix="eval")
        if best is None or improves(record[best_name], best["value"]):
            best = {"name": best_name, "value": record[best_name], "epoch": epoch, "step": step}
        print(f"[verifier] step {step} (epoch {epoch:.2f}): " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()),
              flush=True)
        return record

    for epoch in range(meta.get("epoch", 0), cfg.epochs):
        order = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)
        for bi, idx in enumerate(order):
            host = batch(idx)
            state, metrics = step_fn(state, parallel.shard_batch(jax.tree.map(lambda x: x[rows], host), mesh))
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"verifier loss {metrics['loss']} at step {step}; lower optim.lr")
            writer.write(step, {**metrics, "epoch": epoch + (bi + 1) / len(order)}, prefix="train")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            end = bi == len(order) - 1
            if eval_sets and (end or step % cfg.eval_every_steps == 0):
                last = evaluate(epoch + (bi + 1) / len(order))
        meta = {"step": step, "epoch": epoch + 1, "epoch_end": epoch + 1, "best": best, "eval": last,
                "config": config_lib.to_dict(cfg)}
        ckpt.save(step, state, meta, metric=last.get(best_name) if best_name else None)
    ckpt.wait()
    return {"run_dir": cfg.run_dir, "step": step, "eval": last, "best": best}
