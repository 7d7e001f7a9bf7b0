"""Per-token log-probs, entropies and NLL from hidden states, without `[B, T, V]` float32 logits.

`llama.forward` returns float32 logits for every position and vocabulary entry; at a 128k
vocabulary and a micro-batch of 16 x 1024 tokens that is 8 GiB, plus the same again for the
log-softmax and its gradient. Everything a trainer reads from the logits is per token (the log-prob
of one target, the entropy, the NLL), so this module computes them chunk by chunk of positions:

    hidden, values = llama.hidden_states(params, tokens, positions, mask, config)
    W = llama.lm_head_matrix(params, config)                        # [D, V]
    logp, ent = token_logprobs(hidden, W, targets, chunk=128, with_entropy=True)

Each chunk computes `logits = float32(h_chunk) @ float32(W)` ([B, chunk, V]: exactly `forward`'s
logits for those positions), its logsumexp, the target's logit and optionally the entropy; the
chunk function is wrapped in `jax.checkpoint` and run under `lax.scan`, so the backward pass
recomputes one chunk's logits at a time and the `W` gradient accumulates in float32 across chunks.
Peak memory is O(B * chunk * V), not O(B * T * V). `chunk=None` (or `chunk >= T`) is one chunk,
still rematerialised. T need not be a multiple of `chunk` (padded internally, sliced back).

Conventions:
* `token_logprobs`: position-aligned, `logp[b, t] = log softmax(logits[b, t])[targets[b, t]]`
  (what `llama.token_logprobs` computes; SFT passes `targets = roll(tokens, -1)`).
* `action_logprobs`: `ppo_math`'s action convention, column `t` = log p(tokens[t+1]) from position
  `t`, last column 0 (what `ppo_math.token_logprobs` computes). Entropy is per position for every
  column, the last one included (what `ppo_step._token_entropy` computes); callers mask it.
* `nll_sum`: `(sum of -logp * weights, sum of weights)` (what `sft_step.sequence_nll` computes).
* `policy_logprobs`: the whole model -> `(logp [B, L] action convention, values [B, L], entropy)`,
  what `ppo_step.policy_outputs` returns minus the logits.

Head numerics: logits are float32 whatever the compute dtype (`W` is upcast once, outside the
loop, as `forward` does), so the values match `forward` + log-softmax to float32 rounding.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from reft_jax.model import llama
from reft_jax.model.config import ModelConfig

Array = jax.Array

# Positions per chunk: the [B, chunk, V] float32 logits of one chunk are the working set (Llama 3
# vocabulary 128,256 at B = 16: 1 GiB per chunk).
DEFAULT_CHUNK = 128


def _head_chunk(h: Array, w32: Array, targets: Array, with_entropy: bool) -> tuple[Array, Array | None]:
    """(logp [B, c], entropy [B, c] | None) of one chunk of positions."""
    logits = jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w32, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = picked - lse
    if not with_entropy:
        return logp, None
    lp = logits - lse[..., None]
    ent = -jnp.sum(jnp.where(lp > -jnp.inf, jnp.exp(lp) * lp, 0), axis=-1)
    return logp, ent


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None (one chunk), got {chunk!r}")


def token_logprobs(hidden: Array, lm_head: Array, targets: Array, *, chunk: int | None = DEFAULT_CHUNK,
                   with_entropy: bool = False) -> tuple[Array, Array | None]:
    """Position-aligned target log-probs `[B, T]` (and entropies `[B, T]`), float32.

    `hidden [B, T, D]` (any float dtype; final normed hidden states from `llama.hidden_states`),
    `lm_head [D, V]` (`llama.lm_head_matrix`), `targets [B, T]` int: `logp[b, t] =
    log_softmax(float32(hidden[b, t]) @ float32(lm_head))[targets[b, t]]`. Processed `chunk`
    positions at a time under `jax.checkpoint`; differentiable in `hidden` and `lm_head`.
    """
    _check_chunk(chunk)
    b, t, d = hidden.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets {targets.shape} must be [B, T] = {(b, t)} of hidden {hidden.shape}")
    if lm_head.shape[0] != d:
        raise ValueError(f"lm_head {lm_head.shape} must be [D, V] with D = {d}")
    w32 = lm_head.astype(jnp.float32)  # once, outside the loop: the W gradient accumulates in f32
    fn = jax.checkpoint(functools.partial(_head_chunk, with_entropy=with_entropy), prevent_cse=False)
    c = t if chunk is None or chunk >= t else chunk
    n = -(-t // c)
    if n == 1:
        return fn(hidden, w32, targets)
    pad = n * c - t
    hs = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)  # [n, B, c, D]
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)  # [n, B, c]

    def body(carry, xs):
        return carry, fn(xs[0], w32, xs[1])

    _, out = lax.scan(body, None, (hs, ts))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # noqa: E731
    logp, ent = out
    return unchunk(logp), (unchunk(ent) if with_entropy else None)


def action_logprobs(hidden: Array, lm_head: Array, tokens: Array, *, chunk: int | None = DEFAULT_CHUNK,
                    with_entropy: bool = False) -> tuple[Array, Array | None]:
    """`ppo_math.token_logprobs`' action convention: column `t` = log p(tokens[:, t+1]) at
    position `t`, column `L-1` = 0. Entropy (if asked) is per position, all `L` columns."""
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # the last column's target is a dummy 0
    logp, ent = token_logprobs(hidden, lm_head, targets, chunk=chunk, with_entropy=with_entropy)
    return jnp.pad(logp[:, :-1], ((0, 0), (0, 1))), ent


def nll_sum(hidden: Array, lm_head: Array, targets: Array, weights: Array, *,
            chunk: int | None = DEFAULT_CHUNK) -> tuple[Array, Array]:
    """`(sum_t -logp[t] * weights[t], sum_t weights[t])` with position-aligned `targets` (the SFT
    loss numerator and denominator; `sft_step.sequence_nll`'s form)."""
    logp, _ = token_logprobs(hidden, lm_head, targets, chunk=chunk)
    w = weights.astype(jnp.float32)
    return -(logp * w).sum(), w.sum()


def policy_logprobs(params: Any, tokens: Array, attention_mask: Array, config: ModelConfig, *,
                    chunk: int | None = DEFAULT_CHUNK, with_entropy: bool = False
                    ) -> tuple[Array, Array, Array | None]:
    """`(logp [B, L] action convention, values f32 [B, L], entropy [B, L] | None)` from one model
    pass with positions from the mask: `ppo_step.policy_outputs` without the `[B, L, V]` logits."""
    hidden, values = llama.hidden_states(params, tokens, llama.positions_from_mask(attention_mask),
                                         attention_mask, config)
    logp, ent = action_logprobs(hidden, llama.lm_head_matrix(params, config), tokens, chunk=chunk,
                                with_entropy=with_entropy)
    return logp, values, ent
