"""Training the verifier (ReFT's reward-model reranker, reference §7.4, `train_reward_model.py`).

Training pairs are the per-question unique completions of train-set samples (from the warm-up
checkpoint), labelled by their correctness; loss: 2-class softmax cross-entropy; lr 1e-6 with
10% linear warm-up, 3 epochs, batch 24 (ReFT's recipe). The model, scoring and reranking are
`eval/verifier.py`.

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
import optax
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer, abstract_like
from reft_jax.data.batches import epoch_batches, steps_per_epoch
from reft_jax.data.prompts import COT_TRIGGER, INSTRUCTION, special_ids
from reft_jax.distributed import process_batch_slice
from reft_jax.eval import inference
from reft_jax.eval.verifier import (MARKER, Verifier, VerifierError, check_policy_tokenizer,  # noqa: F401
                                    encode_verifier, init_params, make_batch, param_shapes, param_shardings,
                                    rerank, unique_pairs, verifier_logits)
from reft_jax.metrics import plot_metrics
from reft_jax.model.config import ModelConfig
from reft_jax.reward.answers import answer_kind
from reft_jax.train import loop, sharded
from reft_jax.train.run import (EvalConfig, RunConfig, build_policy, compute_dtype, open_or_start, plan_memory,
                                state_abstract)
from reft_jax.train.state import (OptimConfig, TrainState, accumulate_gradients, apply_gradients,
                                   cast_for_compute, make_optimizer, make_schedule, split_microbatches)


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
def load_verifier(run_dir: str | pathlib.Path, mesh: Mesh, step: str = "latest", batch_bucket: int = 64) -> Verifier:
    """A trained verifier from its run directory (`step`: latest | best | <int>)."""
    from reft_jax.model.tokenizer_io import load_tokenizer

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
        state, _ = ckpt.restore_selected(_state_abstract(model_config, optim, spec["total_steps"], mesh), step)
    return Verifier(model_config, state.params, tokenizer, mesh, info["max_len"], batch_bucket)


def _state_abstract(model_config: ModelConfig, optim: OptimConfig, total_steps: int, mesh: Mesh) -> Any:
    p_abs = abstract_like(param_shapes(model_config), param_shardings(model_config, mesh))
    return state_abstract(model_config, optim, total_steps, mesh, params_abstract=p_abs)


# ----------------------------------------------------------------------------------------------
# Training run
# ----------------------------------------------------------------------------------------------
def _verifier_eval() -> EvalConfig:
    return EvalConfig(every_steps=1000, batch_size=24)


@dataclasses.dataclass
class VerifierConfig(RunConfig):
    """One verifier run. Defaults are ReFT's Rerank recipe (batch 24, lr 1e-6, 10% warm-up,
    3 epochs, 700 tokens, evaluation every 1,000 steps and after every epoch). `model` is the
    policy it starts from; `data` gives the answer kind and the question / gold lookup;
    `eval.batch_size` scores, `eval.timeout` runs the programs of an unlabelled P-CoT sample file."""

    train_samples: str = ""  # JSONL of train-set samples (from the warm-up checkpoint, `reft sample`)
    eval_samples: str | None = None  # JSONL of test-set samples from the policy being reranked
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-6))
    eval: EvalConfig = dataclasses.field(default_factory=_verifier_eval)
    epochs: int = 3
    batch_size: int = 24
    max_len: int = 700
    bucket: int = 64

    def validate(self) -> None:
        self.validate_run()
        if not self.train_samples:
            raise config_lib.ConfigError("required", key="train_samples", value=self.train_samples)
        for name in ("epochs", "batch_size", "max_len", "bucket"):
            if getattr(self, name) < 1:
                raise config_lib.ConfigError("must be >= 1", key=name, value=getattr(self, name))


@dataclasses.dataclass
class VerifierTrainer(loop.Trainer):
    """The verifier's own parts: batches of labelled unique completions, its step, rerank@k."""

    cfg: VerifierConfig | None = None
    batch: Callable | None = None
    n: int = 0
    step_fn: Callable | None = None
    verifier: Verifier | None = None
    eval_sets: list = dataclasses.field(default_factory=list)
    kind: str = "numeric"
    _order: tuple[int, list] | None = None

    def step(self, state, step, epoch, bi, upcoming):
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_batches(self.n, self.cfg.batch_size, self.cfg.seed, epoch))
        host = self.batch(self._order[1][bi])
        rows = process_batch_slice(self.cfg.batch_size, self.run.mesh)
        return self.step_fn(state, parallel.shard_batch(jax.tree.map(lambda x: x[rows], host), self.run.mesh))

    def has_eval(self) -> bool:
        return bool(self.eval_sets)

    def evaluate(self, params, epoch, step):
        metrics, _ = rerank(self.verifier.with_params(params), self.eval_sets, self.kind, self.cfg.eval.batch_size)
        return {k: v for k, v in metrics.items() if k != "num_questions"}


def train_verifier(cfg: VerifierConfig) -> dict[str, Any]:
    """Train (or continue) the verifier of `cfg.run_dir`."""
    cfg.validate()
    mesh = parallel.build_mesh(cfg.mesh)
    kind = answer_kind(cfg.data.dataset)
    with contextlib.ExitStack() as stack:
        timeout = cfg.eval.timeout
        train_sets = inference.load_sample_sets(cfg.train_samples, cfg.data, "train", stack, timeout)
        eval_sets = (inference.load_sample_sets(cfg.eval_samples, cfg.data, "test", stack, timeout)
                     if cfg.eval_samples else [])
        pairs = unique_pairs(train_sets)
        k = max((len(s.completions) for s in eval_sets), default=0)
        best_name = f"rerank@{k}_accuracy" if eval_sets else None
        spe = steps_per_epoch(len(pairs), cfg.batch_size)
        total_steps = spe * cfg.epochs
        tx = make_optimizer(cfg.optim, total_steps)
        run_dir = pathlib.Path(cfg.run_dir)

        def fresh():
            corpus = [INSTRUCTION + p.question + COT_TRIGGER + p.completion for p in pairs] \
                if cfg.model.path is None else None
            model_config, policy, tokenizer = build_policy(cfg.model, mesh, cfg.seed, corpus)
            if tokenizer is None:
                raise VerifierError(f"{cfg.model.path}: the policy has no tokenizer")
            params = init_params(policy, model_config, jax.random.fold_in(jax.random.key(cfg.seed), 1), mesh)
            return model_config, tokenizer, sharded.create_state(params, tx, jax.random.key(cfg.seed), mesh)

        def mark():
            if jax.process_index() == 0:
                (run_dir / MARKER).write_text(json.dumps({"max_len": cfg.max_len, "best_metric": best_name,
                                                          "policy": cfg.model.path, "step": cfg.model.step}))

        run, state, meta = open_or_start(cfg, "verifier", stack, mesh, total_steps, best_name, fresh,
                                         abstract=lambda mc: _state_abstract(mc, cfg.optim, total_steps, mesh),
                                         on_fresh=mark)
        encoded = [encode_verifier(run.tokenizer, p.question, p.completion, cfg.max_len) for p in pairs]
        labels = [p.label for p in pairs]
        pad = special_ids(run.tokenizer).pad
        batch = lambda idx: make_batch(encoded, labels, idx, cfg.batch_size, cfg.bucket, cfg.max_len, pad)  # noqa: E731
        plan_memory(run, "sft", batch=cfg.batch_size, seq_len=cfg.max_len)
        parallel.check_batch(cfg.batch_size, cfg.optim.grad_accum, mesh)
        step_fn = loop.keep_finite(make_verifier_step(run.model_config, tx, make_schedule(cfg.optim, total_steps),
                                                      cfg.optim.grad_accum, compute_dtype(cfg.optim)))
        print(f"[verifier] {run_dir}\n" + config_lib.describe_derived({
            "pairs": (len(pairs), f"unique completions of {len(train_sets)} train questions, "
                                  f"{sum(labels)} correct"),
            "steps/epoch": (spe, f"ceil({len(pairs)} / batch {cfg.batch_size})"),
            "total steps": (total_steps, f"{cfg.epochs} epochs"),
            "eval": (len(eval_sets), f"test questions, k = {k}"),
        }), flush=True)
        trainer = VerifierTrainer(
            name="verifier", run=run, steps_per_epoch=spe, last_epoch=cfg.epochs, best_name=best_name,
            loss_is_nll=False, cfg=cfg, batch=batch, n=len(encoded),
            step_fn=sharded.jit_step(step_fn, state, batch([0]), mesh),
            verifier=Verifier(run.model_config, state.params, run.tokenizer, mesh, cfg.max_len, cfg.bucket),
            eval_sets=eval_sets, kind=kind)
        _, summary = loop.train(trainer, state, meta, stack)
    plot_metrics(run_dir)
    return summary


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
