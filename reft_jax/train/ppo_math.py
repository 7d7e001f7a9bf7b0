"""Pure PPO math for ReFT, in the official code's exact index conventions (reft_reference.md §5.3-§5.7).

Shapes and indices (one convention for every per-token array):
* ``tokens [B, L]`` = left-padded prompt block of length ``P`` (int, or ``[B]`` per-row) followed
  by the completion, right-padded after the first EOS.
* Every per-token array is ``[B, L]``. Column ``t`` is the *action at t*: the policy at position
  ``t`` emitting ``tokens[:, t+1]``. So ``logp[:, t] = log pi(tokens[t+1] | tokens[<=t])`` for
  ``t in [0, L-2]``; column ``L-1`` is not an action: its log-prob is unused (``token_logprobs``
  writes 0) and the action mask is always 0 there. Values ``V[:, t]`` are the value head at
  position ``t`` (all ``L`` columns are real).
* Action mask (``action_mask``): with ``e`` the first EOS at or after ``P``: ``m[t] = 1`` for
  ``t in [P-1, e-1]`` (the action that emits EOS is included); without EOS ``t in [P-1, L-2]``.
  Masks are float (0/1) arrays; every function also accepts bool masks.
* Scores sit on the last action of each row (``e-1`` or ``L-2``); per-token reward
  ``r = score - kl_coef * KL`` (k1 on the sampled token, rollout-time policy) inside the mask.
* Losses: ``loss_agg="seq_mean_token_mean"`` (ReFT: token-mean per sequence, then batch mean) or
  ``"token_mean"`` (all masked tokens of the batch). ``normalize=False`` returns the numerator
  and ``metrics["count"]`` the matching denominator, so microbatches accumulate exactly.

Everything is jnp, shape-polymorphic in ``B`` and ``L``, dtype-following (float32 in training,
float64 in the reference tests), jittable, and free of Python loops over tokens. Reductions are
plain ``jnp.sum``: under ``jit`` with a batch-sharded input GSPMD makes them global; inside
``shard_map``/``pmap`` pass ``axis_name`` to ``whiten``/``masked_mean``/``masked_var``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
AxisName = str | tuple[str, ...] | None

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean")
DEFAULT_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: never reached by real PPO ratios, blocks inf/NaN


# ----------------------------------------------------------------------------------------------
# Masks, placement, log-probs
# ----------------------------------------------------------------------------------------------
def action_mask(tokens: Array, prompt_len: int | Array, eos_ids: Sequence[int] | Array,
                dtype: jnp.dtype = jnp.float32) -> Array:
    """Action mask ``m [B, L]`` (§5.3): ``m[t] = 1`` for ``t in [P-1, e-1]``, ``e`` = first EOS.

    ``prompt_len``: padded prompt length ``P >= 1`` (int or ``[B]``). ``eos_ids``: any number of
    EOS ids (tuple or int array). Without EOS the mask runs to ``L-2``; ``m[:, L-1] = 0`` always.
    EOS ids are searched only in the completion (``t >= P``): unlike the official loop, an EOS id
    inside the prompt block (e.g. pad == eos used for left padding) does not cut the row.
    """
    B, L = tokens.shape
    t = jnp.arange(L)[None, :]
    P = jnp.broadcast_to(jnp.asarray(prompt_len, jnp.int32).reshape(-1, 1), (B, 1))
    eos = jnp.asarray(eos_ids, tokens.dtype).reshape(-1)
    is_eos = jnp.isin(tokens, eos) & (t >= P)
    first_eos = jnp.where(is_eos.any(-1, keepdims=True), jnp.argmax(is_eos, -1, keepdims=True), L)
    end = jnp.minimum(first_eos, L - 1)  # exclusive; the action at e-1 emitted the EOS
    return ((t >= P - 1) & (t < end)).astype(dtype)


def last_action_index(m: Array) -> Array:
    """Index ``[B]`` of each row's last action (``e-1`` or ``L-2``); -1 for an empty row."""
    t = jnp.arange(m.shape[-1])
    return jnp.max(jnp.where(m > 0, t, -1), axis=-1)


def score_rewards(scores: Array, m: Array) -> Array:
    """Place the scalar score ``[B]`` on each row's last action (§4); 0 elsewhere. ``[B, L]``."""
    scores = jnp.asarray(scores)
    hit = jnp.arange(m.shape[-1])[None, :] == last_action_index(m)[:, None]
    return jnp.where(hit, scores[:, None], jnp.zeros((), scores.dtype))


def token_logprobs(logits: Array, tokens: Array) -> Array:
    """``[B, L]`` log-probs of the sampled tokens in the action convention.

    Column ``t`` = ``log_softmax(logits[:, t])[tokens[:, t+1]]`` for ``t <= L-2``; column ``L-1``
    is 0 (no action). ``logits [B, L, V]`` should be float32 (ReFT upcasts before log-softmax).
    """
    lg = logits[:, :-1]
    picked = jnp.take_along_axis(lg, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    lp = picked - jax.nn.logsumexp(lg, axis=-1)
    return jnp.pad(lp, ((0, 0), (0, 1)))


# ----------------------------------------------------------------------------------------------
# Masked reductions (global under GSPMD; explicit collectives with axis_name)
# ----------------------------------------------------------------------------------------------
def _sum(x: Array, axis_name: AxisName) -> Array:
    s = jnp.sum(x)
    return lax.psum(s, axis_name) if axis_name is not None else s


def masked_mean(x: Array, m: Array, axis_name: AxisName = None) -> Array:
    """Mean of ``x`` over ``m > 0`` (all axes); 0 when the mask is empty."""
    m = m.astype(jnp.result_type(x, m, jnp.float32))
    n = _sum(m, axis_name)
    return _sum(jnp.where(m > 0, x, 0), axis_name) / jnp.maximum(n, 1)


def masked_var(x: Array, m: Array, unbiased: bool = True, axis_name: AxisName = None) -> Array:
    """Two-pass masked variance (trl's ``masked_var``); Bessel factor ``n/(n-1)`` if unbiased."""
    mean = masked_mean(x, m, axis_name)
    var = masked_mean((x - mean) ** 2, m, axis_name)
    if unbiased:
        n = _sum(m.astype(var.dtype), axis_name)
        var = var * n / jnp.maximum(n - 1, 1)
    return var


def whiten(x: Array, m: Array, axis_name: AxisName = None, shift_mean: bool = False,
           eps: float = 1e-8) -> Array:
    """Global masked whitening (§5.6): ``(x - mean) / sqrt(var_unbiased + eps)``, no mean add-back.

    Statistics come from the masked entries of the *whole* batch: under ``jit`` that is the global
    batch even when ``x`` is sharded across devices; in ``shard_map``/``pmap`` pass ``axis_name``.
    Entries outside the mask are transformed too (non-zero), as in ReFT; consumers mask them.
    """
    mean = masked_mean(x, m, axis_name)
    out = (x - mean) * lax.rsqrt(masked_var(x, m, True, axis_name) + eps)
    return out + mean if shift_mean else out


# ----------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# ----------------------------------------------------------------------------------------------
def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """k1 = log p - log q on the sampled token: unbiased for KL(p||q), can be negative (ReFT)."""
    return logp - ref_logp


def kl_k2(logp: Array, ref_logp: Array) -> Array:
    """k2 = (log p - log q)^2 / 2: biased, low variance, non-negative."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """k3 = q/p - 1 - log(q/p): unbiased for KL(p||q) and non-negative (Schulman's estimator)."""
    log_r = ref_logp - logp
    return jnp.exp(log_r) - 1 - log_r


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def token_rewards(score_rew: Array, logp_old: Array, logp_ref: Array, m: Array, kl_coef: float | Array,
                  estimator: str = "k1", kl_in_reward: bool = True) -> tuple[Array, Array]:
    """Per-token rewards ``[B, L]`` (§5.4) and the masked per-token KL ``[B, L]`` (for logging).

    ``score_rew``: placed scores from ``score_rewards``. ``logp_old``/``logp_ref``: rollout-time
    policy and reference log-probs (action convention). ReFT: ``r = score - kl_coef * k1`` inside
    the mask. ``kl_in_reward=False`` (KL-in-loss mode, e.g. GRPO): ``r = score`` and the trainer
    adds ``kl_coef * kl_loss(...)`` to its loss instead.
    """
    mb = m > 0
    kl = jnp.where(mb, KL_ESTIMATORS[estimator](logp_old, logp_ref), 0)
    score = jnp.where(mb, score_rew, 0)
    return (score - kl_coef * kl if kl_in_reward else score), kl


# ----------------------------------------------------------------------------------------------
# GAE and advantage estimators
# ----------------------------------------------------------------------------------------------
def discounted_cumsum(x: Array, discount: float | Array) -> Array:
    """``y[..., t] = sum_k discount^k x[..., t+k]`` along the last axis (reverse ``lax.scan``)."""
    xt = jnp.moveaxis(x, -1, 0)
    d = jnp.asarray(discount, xt.dtype)

    def step(carry: Array, x_t: Array) -> tuple[Array, Array]:
        carry = x_t + d * carry
        return carry, carry

    _, ys = lax.scan(step, jnp.zeros_like(xt[0]), xt, reverse=True)
    return jnp.moveaxis(ys, 0, -1)


def gae(rewards: Array, values: Array, m: Array, gamma: float | Array = 1.0,
        lam: float | Array = 0.95) -> tuple[Array, Array]:
    """GAE advantages and lambda-returns ``[B, L]`` (§5.5), both zero outside the mask.

    ``V`` is zeroed outside the mask, so the last action bootstraps from 0 (terminal, also for
    length-truncated rows) and nothing leaks in from the prompt or the padding;
    ``delta[t] = r[t] + gamma V[t+1] - V[t]``, ``A = discounted_cumsum(delta, gamma*lam)``,
    ``R = A + V``. ReFT: gamma (TD discount) = 1.0, lam (GAE decay) = 0.95.
    """
    m = m.astype(rewards.dtype)
    r, v = rewards * m, values.astype(rewards.dtype) * m
    v_next = jnp.pad(v[..., 1:], [(0, 0)] * (v.ndim - 1) + [(0, 1)])
    adv = discounted_cumsum(r + gamma * v_next - v, gamma * lam) * m
    return adv, (adv + v) * m


def _groups(x: Array, group_size: int) -> Array:
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"batch {x.shape[0]} is not a multiple of group_size {group_size}")
    return x.reshape(-1, group_size)


def _sequence_advantage(rewards: Array, m: Array, gamma: float | Array, seq_adv: Array
                        ) -> tuple[Array, Array]:
    """Broadcast ``[B]`` advantages over the mask; returns = masked reward-to-go (no critic)."""
    m = m.astype(rewards.dtype)
    return seq_adv[:, None] * m, discounted_cumsum(rewards * m, gamma) * m


def gae_advantages(rewards: Array, values: Array, m: Array, *, gamma: float | Array = 1.0,
                   lam: float | Array = 0.95, group_size: int = 1) -> tuple[Array, Array]:
    """Registry adapter for ``gae`` (``group_size`` unused)."""
    del group_size
    return gae(rewards, values, m, gamma, lam)


def grpo_advantages(rewards: Array, values: Array, m: Array, *, gamma: float | Array = 1.0,
                    lam: float | Array = 0.95, group_size: int = 1, eps: float = 1e-4
                    ) -> tuple[Array, Array]:
    """GRPO: ``(R_i - mean_g) / (std_g + eps)`` per group, unbiased std (TRL's convention).

    ``R_i = sum_t rewards * m`` (= the score when ``kl_in_reward=False``). Rows are grouped as
    consecutive blocks of ``group_size`` samples of the same question. ``values``/``lam`` unused.
    """
    del values, lam
    g = _groups(jnp.sum(rewards * m.astype(rewards.dtype), -1), group_size)
    mean = g.mean(-1, keepdims=True)
    std = jnp.sqrt(jnp.sum((g - mean) ** 2, -1, keepdims=True) / max(group_size - 1, 1))
    return _sequence_advantage(rewards, m, gamma, ((g - mean) / (std + eps)).reshape(-1))


def rloo_advantages(rewards: Array, values: Array, m: Array, *, gamma: float | Array = 1.0,
                    lam: float | Array = 0.95, group_size: int = 2) -> tuple[Array, Array]:
    """RLOO: ``R_i - mean_{j != i} R_j`` within each group of ``group_size >= 2`` samples."""
    del values, lam
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2")
    g = _groups(jnp.sum(rewards * m.astype(rewards.dtype), -1), group_size)
    baseline = (g.sum(-1, keepdims=True) - g) / (group_size - 1)
    return _sequence_advantage(rewards, m, gamma, (g - baseline).reshape(-1))


# Common signature: (rewards [B,L], values [B,L], m [B,L], *, gamma, lam, group_size)
#                   -> (advantages [B,L], returns [B,L]), both zero outside the mask.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
}


class AdvantageBatch(NamedTuple):
    """Everything the PPO epochs need from one rollout batch; all ``[B, L]``, masked."""
    mask: Array            # action mask
    score_rewards: Array   # score on the last action
    kl: Array              # per-token KL estimate (rollout policy vs reference)
    rewards: Array         # per-token rewards fed to the estimator
    values: Array          # old values, zero outside the mask (value-clip centre)
    raw_advantages: Array  # before whitening (logging)
    advantages: Array      # whitened (if requested), zero outside the mask
    returns: Array         # value targets


def compute_advantages(tokens: Array, prompt_len: int | Array, scores: Array, logp_old: Array,
                       logp_ref: Array, values: Array, *, eos_ids: Sequence[int] | Array,
                       kl_coef: float | Array, kl_estimator: str = "k1", kl_in_reward: bool = True,
                       advantage_estimator: str = "gae", gamma: float | Array = 1.0,
                       lam: float | Array = 0.95, group_size: int = 1,
                       whiten_advantages: bool = True, axis_name: AxisName = None
                       ) -> AdvantageBatch:
    """The whole rollout-side chain in one jittable call: mask -> rewards -> estimator -> whiten.

    ``scores [B]`` (1 / 0.1 / 0 in ReFT); ``logp_old``, ``logp_ref``, ``values`` ``[B, L]`` in the
    action convention. ReFT defaults: k1 KL in the reward, GAE(1.0, 0.95), global whitening. Under
    ``jit`` mark ``eos_ids`` (a tuple), ``kl_estimator``, ``kl_in_reward``, ``advantage_estimator``,
    ``group_size`` and ``whiten_advantages`` static. Whitened advantages are re-masked (ReFT
    leaves them non-zero outside the mask; every loss masks them, so the numbers are the same).
    """
    dtype = jnp.result_type(values, jnp.float32)
    m = action_mask(tokens, prompt_len, eos_ids, dtype=dtype)
    score_rew = score_rewards(jnp.asarray(scores, dtype), m)
    rewards, kl = token_rewards(score_rew, logp_old, logp_ref, m, kl_coef, kl_estimator, kl_in_reward)
    v = values.astype(dtype) * m
    raw, returns = ADVANTAGE_ESTIMATORS[advantage_estimator](rewards, v, m, gamma=gamma, lam=lam,
                                                   group_size=group_size)
    adv = whiten(raw, m, axis_name) * m if whiten_advantages else raw
    return AdvantageBatch(m, score_rew, kl, rewards, v, raw, adv, returns)


# ----------------------------------------------------------------------------------------------
# Losses and diagnostics
# ----------------------------------------------------------------------------------------------
def aggregate(tok: Array, m: Array, loss_agg: str = "seq_mean_token_mean") -> tuple[Array, Array]:
    """``(numerator, denominator)`` of a masked per-token loss ``[B, L]``; loss = num / den.

    ``seq_mean_token_mean`` (ReFT): num = sum_b sum_t(l m) / max(sum_t m, 1), den = B.
    ``token_mean``: num = sum(l m), den = sum(m). Summing nums and dens over microbatches and
    dividing once gives the exact minibatch loss (see ``state.accumulate_gradients``).
    """
    m = m.astype(jnp.result_type(tok, jnp.float32))
    lm = jnp.where(m > 0, tok, 0)
    if loss_agg == "seq_mean_token_mean":
        per_seq = jnp.sum(lm, -1) / jnp.maximum(jnp.sum(m, -1), 1)
        return jnp.sum(per_seq), jnp.asarray(per_seq.size, per_seq.dtype)
    if loss_agg == "token_mean":
        return jnp.sum(lm), jnp.sum(m)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")


def _finish(tok: Array, m: Array, loss_agg: str, normalize: bool, metrics: dict[str, Array]
            ) -> tuple[Array, dict[str, Array]]:
    num, den = aggregate(tok, m, loss_agg)
    metrics = {k: lax.stop_gradient(v) for k, v in metrics.items()}
    metrics["count"] = lax.stop_gradient(den)
    return (num / den if normalize else num), metrics


def policy_loss(logp: Array, logp_old: Array, advantages: Array, m: Array, clip: float = 0.2,
                log_ratio_clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
                loss_agg: str = "seq_mean_token_mean", normalize: bool = True
                ) -> tuple[Array, dict[str, Array]]:
    """Clipped PPO surrogate (§5.7): ``max(-A r, -A clip(r, 1-clip, 1+clip))``, aggregated.

    All inputs ``[B, L]`` (action convention). The log-ratio is zeroed outside the mask and
    clamped to ``±log_ratio_clamp`` before ``exp`` (a guard against inf/NaN; ±20 never binds for
    real ratios; ``None`` disables it). Metrics (masked token means): ``clipfrac`` (clipped branch
    active), ``approx_kl`` (k3 of KL(old||new): mean(r - 1 - log r)), ``ratio_mean``,
    ``log_ratio_clamped_frac``, and ``count`` (the loss denominator).
    """
    log_ratio = jnp.where(m > 0, logp - logp_old, 0)
    clamped = log_ratio
    if log_ratio_clamp is not None:
        clamped = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(clamped)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)
    metrics = dict(clipfrac=masked_mean(pg2 > pg1, m), approx_kl=masked_mean(ratio - 1 - clamped, m),
                   ratio_mean=masked_mean(ratio, m),
                   log_ratio_clamped_frac=masked_mean(clamped != log_ratio, m))
    return _finish(jnp.maximum(pg1, pg2), m, loss_agg, normalize, metrics)


def value_loss(values: Array, values_old: Array, returns: Array, m: Array, clip: float | None = 0.2,
               loss_agg: str = "seq_mean_token_mean", normalize: bool = True
               ) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss (§5.7): ``0.5 max((V-R)^2, (clip(V, V_old±clip)-R)^2)``, aggregated.

    ``values`` are the new value-head outputs, ``values_old`` the rollout values (the clip centre),
    ``returns`` the targets, all ``[B, L]``. ``clip=None`` disables clipping. Metrics: ``clipfrac``
    (clipped branch strictly larger), ``value_mean``, ``count``. Multiply by ``vf_coef`` (ReFT 5).
    """
    vf1 = (values - returns) ** 2
    vf2 = vf1
    if clip is not None:
        vf2 = (jnp.clip(values, values_old - clip, values_old + clip) - returns) ** 2
    metrics = dict(clipfrac=masked_mean(vf2 > vf1, m), value_mean=masked_mean(values, m))
    return _finish(0.5 * jnp.maximum(vf1, vf2), m, loss_agg, normalize, metrics)


def kl_loss(logp: Array, logp_ref: Array, m: Array, estimator: str = "k3",
            log_ratio_clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
            loss_agg: str = "seq_mean_token_mean", normalize: bool = True
            ) -> tuple[Array, dict[str, Array]]:
    """KL(pi || ref) as a loss term for KL-in-loss mode (not ReFT); the trainer adds kl_coef * it.

    Estimators depend only on ``d = logp - logp_ref``; ``d`` is masked and clamped like the
    policy log-ratio so ``k3``'s ``exp`` cannot overflow. Metrics: ``kl_mean``, ``count``.
    """
    d = jnp.where(m > 0, logp - logp_ref, 0)
    if log_ratio_clamp is not None:
        d = jnp.clip(d, -log_ratio_clamp, log_ratio_clamp)
    tok = KL_ESTIMATORS[estimator](d, jnp.zeros_like(d))
    return _finish(tok, m, loss_agg, normalize, dict(kl_mean=masked_mean(tok, m)))


def entropy_from_logits(logits: Array, m: Array, axis_name: AxisName = None) -> Array:
    """Masked token-mean entropy of the policy at the action positions (``logits [B, L, V]``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    ent = -jnp.sum(jnp.where(p > 0, p * logp, 0), axis=-1)  # safe with -inf (masked-vocab) logits
    return masked_mean(ent, m, axis_name)


def explained_variance(values: Array, returns: Array, m: Array, axis_name: AxisName = None) -> Array:
    """``1 - var(R - V) / (var(R) + 1e-8)`` over the mask (unbiased), floored at -1 as in ReFT."""
    num = masked_var(returns - values, m, True, axis_name)
    return jnp.maximum(1 - num / (masked_var(returns, m, True, axis_name) + 1e-8), -1.0)
