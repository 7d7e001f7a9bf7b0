"""Device-side pieces of one ReFT PPO step: pure, jittable, sharding-agnostic.

The host loop (``ppo.py``) calls them in this order for every rollout batch::

    scored  = score_pass(params, ref_params, rollout)          # needs no rewards: dispatched
                                                                # before the host scores texts
    batch, stats = assemble(scored, rollout, scores)           # rewards -> GAE -> whitening
    for ppo_epoch, minibatch in ...:
        state, metrics = ppo_update(state, minibatch)          # jit_step, state donated

Array conventions are ``ppo_math``'s: every per-token array is ``[B, L]`` and column ``t`` is
the action emitting ``tokens[:, t+1]``. A rollout row is ``[left-padded prompt | completion]``
with the prompt block of width ``P`` (``prompt_len [B]``); ``attention_mask`` is 1 on real prompt
tokens and on completion tokens up to and including EOS.

Why the score pass recomputes log-probs: ReFT takes the "old" log-probs from a full forward of
the policy on the sampled sequences, not from the sampler (§5.2); the two differ by float noise
(KV-cache vs full attention) and that noise enters the ratio of the first PPO epoch.
``PPOAlgoConfig.sampler_logprobs`` switches to the sampler's values to save the log-softmax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from reft_jax.model import logprobs
from reft_jax.model.config import ModelConfig
from reft_jax.train import ppo_math
from reft_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, cast_for_compute,
                                   split_microbatches)

Array = jax.Array
PyTree = Any
Batch = dict[str, Array]

# Keys of the PPO training batch (all [B, L]); the update step reads exactly these.
BATCH_KEYS = ("tokens", "attention_mask", "mask", "logp_old", "logp_ref", "values_old",
              "advantages", "returns")


VALUE_HEAD_INITS = ("torch_default", "zeros")


@dataclasses.dataclass(unsafe_hash=True)  # hashable: a static argument of jitted test helpers
class PPOAlgoConfig:
    """ReFT's PPO objective (reference §5, §8b): the section of a PPO run's config that the
    device math reads. The run's `PPOConfig` extends it and is passed to the step functions
    whole (as tunix passes its `algo_config`); the names are the config's own.

    Defaults are ReFT's: k1 KL in the reward with a fixed ``kl_coef`` (0.01 P-CoT, 0.05 N-CoT),
    GAE with TD discount ``gamma`` 1.0 and decay ``lam`` 0.95, global whitening, clip 0.2 for
    both the policy ratio and the value, ``vf_coef`` 5, per-sequence token-mean then batch mean,
    2 PPO epochs over the whole batch (``mini_batch_size`` 0). ``kl_in_reward=False`` adds
    ``kl_coef * kl_loss(kl_estimator)`` to the loss instead (GRPO style).
    ``advantage_estimator`` is a key of ``ppo_math.ADVANTAGE_ESTIMATORS`` (gae; grpo and rloo
    compare the samples of one question). ``score_microbatches`` splits the score pass over rows
    (one ``[B/n, L, V]`` logits block at a time). ``sampler_logprobs`` takes the old log-probs
    from the sampler instead of ReFT's recomputing forward. ``ref_dtype`` holds the frozen
    reference in e.g. bfloat16; ``value_head_init`` keeps the loaded head or zeros it.
    """

    kl_coef: float = 0.01
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
    log_ratio_clamp: float | None = ppo_math.DEFAULT_LOG_RATIO_CLAMP
    ppo_epochs: int = 2
    mini_batch_size: int = 0  # 0 = the whole batch: ReFT's one optimizer step per PPO epoch
    score_microbatches: int | str = 1  # or auto: the memory planner picks the smallest that fits
    sampler_logprobs: bool = False  # ReFT recomputes the old log-probs with a full forward
    value_head_init: str = "torch_default"  # keep the loaded (randomly initialised) head | zeros
    ref_dtype: str | None = None

    def validate_algo(self) -> None:
        from reft_jax.config import ConfigError

        choices = {"kl_estimator": tuple(ppo_math.KL_ESTIMATORS),
                   "advantage_estimator": tuple(ppo_math.ADVANTAGE_ESTIMATORS),
                   "loss_agg": ppo_math.LOSS_AGGREGATIONS, "value_head_init": VALUE_HEAD_INITS,
                   "ref_dtype": (None, "float32", "bfloat16", "float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"must be one of {allowed}", key=name, value=getattr(self, name))
        if self.ppo_epochs < 1:
            raise ConfigError("must be >= 1", key="ppo_epochs", value=self.ppo_epochs)
        if self.score_microbatches != "auto" and (not isinstance(self.score_microbatches, int)
                                                  or self.score_microbatches < 1):
            raise ConfigError("must be an int >= 1 or auto", key="score_microbatches", value=self.score_microbatches)


# ----------------------------------------------------------------------------------------------
# Model outputs in the action convention
# ----------------------------------------------------------------------------------------------
def policy_outputs(params: PyTree, tokens: Array, attention_mask: Array, config: ModelConfig,
                   compute_dtype: str | None = None, chunk: int | None = logprobs.DEFAULT_CHUNK,
                   with_entropy: bool = False) -> tuple[Array, Array, Array | None]:
    """``(logp [B, L], values [B, L], entropy [B, L] | None)`` from one full forward (float32 out),
    the head chunked (``model/logprobs.py``: no ``[B, L, V]`` float32 logits).

    Positions come from the mask (``cumsum - 1``), so a left-padded row sees the positions its
    unpadded self would; ReFT's Llama got ``0..L-1`` instead, which RoPE makes equivalent.
    """
    p = cast_for_compute(params, compute_dtype) if compute_dtype else params
    return logprobs.policy_logprobs(p, tokens, attention_mask, config, chunk=chunk, with_entropy=with_entropy)


def merge_microbatches(x: PyTree) -> PyTree:
    """Inverse of ``state.split_microbatches``: ``[n, B/n, ...] -> [B, ...]`` (strided rows)."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:]), x)


def score_pass(params: PyTree, ref_params: PyTree, rollout: Batch, config: ModelConfig,
               cfg: PPOAlgoConfig, *, eos_ids: tuple[int, ...], compute_dtype: str | None = None,
               chunk: int | None = logprobs.DEFAULT_CHUNK) -> Batch:
    """Rollout-time policy log-probs and values, reference log-probs, per-token entropy.

    ``rollout``: ``tokens``, ``attention_mask``, ``prompt_len [B]``, optionally ``mask_tokens``
    (what the action mask reads, see ``rollout.trim_rollout``; default ``tokens``) and, when
    ``cfg.sampler_logprobs``, ``sampler_logp [B, L]`` (action convention). No gradients flow.
    Runs over ``cfg.score_microbatches`` row blocks (``lax.map``) so the ``[B, L, V]`` logits
    never exist at once. Returns ``logp_old``, ``values``, ``logp_ref``, ``entropy`` (all
    ``[B, L]``; entropy is 0 outside the action mask).
    """
    def one(mb: Batch) -> Batch:
        m = ppo_math.action_mask(mb["mask_tokens"], mb["prompt_len"], eos_ids)
        logp, values, ent = policy_outputs(params, mb["tokens"], mb["attention_mask"], config, compute_dtype,
                                           chunk, with_entropy=True)
        ent = ent * m
        ref_logp, _, _ = policy_outputs(ref_params, mb["tokens"], mb["attention_mask"], config, chunk=chunk)
        if cfg.sampler_logprobs:
            logp = mb["sampler_logp"].astype(jnp.float32)
        return {"logp_old": logp * m, "values": values, "logp_ref": ref_logp * m, "entropy": ent}

    keys = ("tokens", "attention_mask", "prompt_len") + (("sampler_logp",) if cfg.sampler_logprobs else ())
    inputs = {k: rollout[k] for k in keys}
    inputs["mask_tokens"] = rollout.get("mask_tokens", rollout["tokens"])
    if cfg.score_microbatches == 1:
        out = one(inputs)
    else:
        out = merge_microbatches(lax.map(one, split_microbatches(inputs, cfg.score_microbatches)))
    return jax.tree.map(lax.stop_gradient, out)


# ----------------------------------------------------------------------------------------------
# Rewards -> advantages -> the PPO training batch
# ----------------------------------------------------------------------------------------------
def assemble(scored: Batch, rollout: Batch, scores: Array, cfg: PPOAlgoConfig, *, eos_ids: tuple[int, ...],
             group_size: int = 1) -> tuple[Batch, dict[str, Array]]:
    """The PPO training batch and rollout statistics from the score pass and the scalar scores.

    Everything (mask, score placement, KL shaping, advantage estimator, global whitening) is
    ``ppo_math.compute_advantages``; under ``jit`` with the batch sharded over devices the
    whitening statistics are global (all devices, all masked tokens), as ReFT's all-gather.
    """
    adv = ppo_math.compute_advantages(
        rollout.get("mask_tokens", rollout["tokens"]), rollout["prompt_len"], scores, scored["logp_old"],
        scored["logp_ref"], scored["values"], eos_ids=eos_ids, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
        kl_in_reward=cfg.kl_in_reward, advantage_estimator=cfg.advantage_estimator, gamma=cfg.gamma, lam=cfg.lam,
        group_size=group_size, whiten_advantages=cfg.whiten_advantages)
    m = adv.mask
    batch = {"tokens": rollout["tokens"], "attention_mask": rollout["attention_mask"], "mask": m,
             "logp_old": scored["logp_old"], "logp_ref": scored["logp_ref"],
             "values_old": adv.values, "advantages": adv.advantages, "returns": adv.returns}
    n_tok = jnp.sum(m, -1)
    stats = {
        "score_mean": jnp.mean(scores),
        "kl_seq_mean": jnp.mean(jnp.sum(adv.kl, -1)),  # ReFT logs the mean *sequence* KL
        "kl_token_mean": ppo_math.masked_mean(adv.kl, m),
        "return_seq_mean": jnp.mean(jnp.sum(adv.rewards, -1)),  # score - kl_coef * KL, summed
        "entropy": ppo_math.masked_mean(scored["entropy"], m),
        "value_mean": ppo_math.masked_mean(adv.values, m),
        "returns_mean": ppo_math.masked_mean(adv.returns, m),
        "adv_raw_mean": ppo_math.masked_mean(adv.raw_advantages, m),
        "adv_raw_std": jnp.sqrt(ppo_math.masked_var(adv.raw_advantages, m)),
        "explained_variance": ppo_math.explained_variance(adv.values, adv.returns, m),
        "response_length": jnp.mean(n_tok),
        "response_length_max": jnp.max(n_tok),
        "tokens": jnp.sum(n_tok),
    }
    return batch, stats


# ----------------------------------------------------------------------------------------------
# The update step
# ----------------------------------------------------------------------------------------------
# Token-weighted diagnostics accumulated as sums over microbatches (exact under accumulation).
_TOKEN_METRICS = ("pg_clipfrac", "approx_kl", "ratio_mean", "log_ratio_clamped_frac", "vf_clipfrac",
                  "value_mean")


def loss_terms(params: PyTree, mb: Batch, config: ModelConfig, cfg: PPOAlgoConfig,
               normalize: bool = True, compute_dtype: str | None = None,
               chunk: int | None = logprobs.DEFAULT_CHUNK) -> tuple[Array, Array, dict[str, Array]]:
    """``(loss, denominator, aux)`` of ``pg + vf_coef * vf (+ kl_coef * kl if KL-in-loss)``.

    With ``normalize=False`` ``loss`` is the numerator (the form ``accumulate_gradients`` sums);
    policy, value and KL terms share the denominator (same mask, same aggregation), so the sum
    of numerators over the shared count is exactly the normalised total.
    """
    m = mb["mask"]
    logp, values, _ = policy_outputs(params, mb["tokens"], mb["attention_mask"], config, compute_dtype, chunk)
    pg, pgm = ppo_math.policy_loss(logp, mb["logp_old"], mb["advantages"], m, cfg.clip,
                                   cfg.log_ratio_clamp, cfg.loss_agg, normalize)
    vf, vfm = ppo_math.value_loss(values, mb["values_old"], mb["returns"], m, cfg.value_clip,
                                  cfg.loss_agg, normalize)
    total = pg + cfg.vf_coef * vf
    kl = jnp.zeros((), jnp.float32)
    if not cfg.kl_in_reward and cfg.kl_coef:
        kl, _ = ppo_math.kl_loss(logp, mb["logp_ref"], m, cfg.kl_estimator, cfg.log_ratio_clamp,
                                 cfg.loss_agg, normalize)
        total = total + cfg.kl_coef * kl
    ntok = jnp.sum(m)
    aux = {"pg_loss": pg, "vf_loss": vf, "kl_loss": kl, "ntok": ntok, "count": pgm["count"],
           "pg_clipfrac": pgm["clipfrac"], "approx_kl": pgm["approx_kl"],
           "ratio_mean": pgm["ratio_mean"], "log_ratio_clamped_frac": pgm["log_ratio_clamped_frac"],
           "vf_clipfrac": vfm["clipfrac"], "value_mean": vfm["value_mean"]}
    if not normalize:  # token-weighted sums, so microbatches combine exactly
        aux.update({k: aux[k] * ntok for k in _TOKEN_METRICS})
    return total, pgm["count"], jax.tree.map(lax.stop_gradient, aux)


def make_loss_and_grads(config: ModelConfig, cfg: PPOAlgoConfig, *, grad_accum: int = 1,
                        compute_dtype: str | None = None, chunk: int | None = logprobs.DEFAULT_CHUNK
                        ) -> Callable[[PyTree, Batch], tuple[Array, PyTree, dict[str, Array]]]:
    """``f(params, minibatch) -> (loss, grads, metrics)``: the exact minibatch loss and gradient,
    accumulated over ``grad_accum`` strided microbatches (pure; the update step wraps it)."""

    def micro(params: PyTree, mb: Batch) -> tuple:
        (num, (count, aux)), grads = jax.value_and_grad(
            lambda p: _pack(loss_terms(p, mb, config, cfg, normalize=False, compute_dtype=compute_dtype,
                                       chunk=chunk)),
            has_aux=True)(params)
        return num, count, aux, grads

    def loss_and_grads(params: PyTree, minibatch: Batch) -> tuple[Array, PyTree, dict[str, Array]]:
        mbs = split_microbatches({k: minibatch[k] for k in BATCH_KEYS}, grad_accum)
        loss, grads, aux = accumulate_gradients(micro, params, mbs, has_aux=True)
        sums = jax.tree.map(lambda a: jnp.sum(a, 0), aux)
        count, ntok = jnp.maximum(sums["count"], 1.0), jnp.maximum(sums["ntok"], 1.0)
        metrics = {"loss": loss, "pg_loss": sums["pg_loss"] / count, "vf_loss": sums["vf_loss"] / count,
                   "kl_loss": sums["kl_loss"] / count}
        metrics.update({k: sums[k] / ntok for k in _TOKEN_METRICS})
        return loss, grads, metrics

    return loss_and_grads


def _pack(terms: tuple) -> tuple:
    total, count, aux = terms
    return total, (count, aux)


def make_ppo_update(config: ModelConfig, tx: optax.GradientTransformation, cfg: PPOAlgoConfig, *,
                    grad_accum: int = 1, compute_dtype: str | None = None,
                    chunk: int | None = logprobs.DEFAULT_CHUNK
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """``ppo_update(state, minibatch) -> (state, metrics)``; jit it with ``sharded.jit_step``.

    Guard rail: when the loss or the gradient norm is not finite the optimizer update is skipped
    (the returned state equals the input state) and ``metrics["nonfinite"]`` is 1; the host
    loop then stops the run, so neither the live state nor any checkpoint is poisoned.
    """
    loss_and_grads = make_loss_and_grads(config, cfg, grad_accum=grad_accum, compute_dtype=compute_dtype,
                                         chunk=chunk)

    def step(state: TrainState, minibatch: Batch) -> tuple[TrainState, dict[str, Array]]:
        loss, grads, metrics = loss_and_grads(state.params, minibatch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = lax.cond(finite, lambda: apply_gradients(state, grads, tx), lambda: state)
        metrics.update(grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------------------------
# Params helpers
# ----------------------------------------------------------------------------------------------
def make_reference(params: PyTree, dtype: str | None = None) -> PyTree:
    """A frozen copy of the policy params (optionally held in ``dtype``, e.g. bfloat16).

    Always new buffers with the same shardings: the policy params are donated to the update
    step, so the reference must never alias them.
    """
    shardings = jax.tree.map(lambda a: a.sharding, params)
    copy = jax.jit(lambda p: jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), p),
                   out_shardings=shardings)(params)
    return cast_for_compute(copy, dtype) if dtype else copy


def zero_value_head(params: PyTree) -> PyTree:
    """Params with the value head re-initialised to zeros (``value_head_init: zeros``)."""
    return {**params, "value_head": jax.tree.map(jnp.zeros_like, params["value_head"])}
