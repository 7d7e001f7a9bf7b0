"""Training state, optimizer and LR schedules, exact gradient accumulation, mixed-precision casts.

ReFT's recipe (reft_reference.md §5.7, §6): AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0),
global-norm gradient clipping 1.0, fp32 master weights with bf16 compute; SFT uses HF's
``get_linear_schedule_with_warmup`` with ``int(0.1 * total)`` warm-up steps, RL a constant LR.

Precision policy: the state always holds the master params (float32 in ReFT). A loss that wants
bf16 compute calls ``cast_for_compute(params, "bfloat16")`` *inside* the differentiated function:
the cast is differentiable, so gradients land on the float32 params in float32 and the optimizer
update happens in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

PyTree = Any
SCHEDULES = ("linear_warmup_decay", "constant", "constant_with_warmup")
NO_DECAY_KEYS = ("bias", "scale")  # ReFT/HF: biases and norm weights ("LayerNorm.weight") get no decay


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree (checkpoint it, shard it, donate it).

    ``step`` counts optimizer updates (int32 scalar) and is what the LR schedule sees; ``rng``
    is a JAX key owned by the trainer (split it there; ``apply_gradients`` does not touch it).
    The optimizer itself is not stored: pass the same ``tx`` to ``apply_gradients``.
    """
    params: PyTree
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng)


def apply_gradients(state: TrainState, grads: PyTree, tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update (clip -> AdamW with the scheduled LR); ``step += 1``."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1)


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and schedule settings (defaults = ReFT SFT; RL uses lr 3e-7, schedule "constant").

    ``warmup_steps`` (>= 0) overrides ``warmup_ratio`` (ReFT's ``--warmup_step``); warm-up steps
    are otherwise ``int(warmup_ratio * total_steps)``. ``schedule="constant"`` ignores warm-up.
    ``clip_norm=None`` disables clipping. ``grad_accum`` is the number of microbatches one
    optimizer step is split into (see ``accumulate_gradients``); it does not change the optimizer.
    ``compute_dtype`` is the dtype the loss casts params to (``cast_for_compute``); the master
    params and the optimizer state stay in their own (float32) dtype.
    """
    lr: float = 1e-5
    schedule: str = "linear_warmup_decay"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    eps: float = 1e-8
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float | None = 1.0
    grad_accum: int | str = 1  # or auto: the memory planner picks the smallest that fits
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.grad_accum != "auto" and (not isinstance(self.grad_accum, int) or self.grad_accum < 1):
            raise ValueError(f"grad_accum must be an int >= 1 or auto, got {self.grad_accum!r}")


def num_warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """``cfg.warmup_steps`` if set (>= 0), else ``int(cfg.warmup_ratio * total_steps)`` (ReFT)."""
    if cfg.warmup_steps is not None and cfg.warmup_steps >= 0:
        return int(cfg.warmup_steps)
    return int(cfg.warmup_ratio * total_steps)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """LR as a function of the number of updates already applied (``count``, 0 for the first).

    ``linear_warmup_decay`` is HF's ``get_linear_schedule_with_warmup`` exactly:
    ``lr * count / max(1, W)`` for ``count < W``, then ``lr * max(0, (T - count) / max(1, T - W))``
    (so the first update runs at LR 0 when ``W > 0``, and the LR is 0 from ``count = T`` on).
    ``constant_with_warmup`` is HF's ``get_constant_schedule_with_warmup``.
    """
    lr, T, W = cfg.lr, int(total_steps), num_warmup_steps(cfg, total_steps)

    def warm(c: jax.Array) -> jax.Array:
        return c / max(1, W)

    def schedule(count: jax.Array) -> jax.Array:
        c = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "constant":
            return jnp.full_like(c, lr)
        if cfg.schedule == "constant_with_warmup":
            return lr * jnp.where(c < W, warm(c), 1.0)
        return lr * jnp.where(c < W, warm(c), jnp.maximum(0.0, (T - c) / max(1, T - W)))

    return schedule


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params: PyTree, no_decay: Sequence[str] = NO_DECAY_KEYS) -> PyTree:
    """True for leaves that get weight decay: not a bias, not a norm scale (matched by path)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not any(k in _path_str(p) for k in no_decay), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm(cfg.clip_norm)`` -> AdamW(schedule, b1, b2, eps, wd on weights only).

    Matches torch ``clip_grad_norm_`` + ``AdamW`` (decoupled decay ``lr * wd * p``, eps outside the
    sqrt) up to torch's ``+1e-6`` in the clip denominator.
    """
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=decay_mask if cfg.weight_decay else None))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------
def split_microbatches(batch: PyTree, num: int) -> PyTree:
    """``[B, ...] -> [num, B // num, ...]`` with *strided* rows (microbatch i = rows i, i+num, ...).

    Strided, so that with the batch sharded over devices on axis 0 every microbatch still spans
    all devices (a contiguous split would put each microbatch on a subset of them). Exact
    accumulation is invariant to which rows share a microbatch.
    """
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num:
            raise ValueError(f"batch {x.shape[0]} is not divisible into {num} microbatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_and_grad_fn: Callable[..., tuple], params: PyTree, microbatches: PyTree,
                         has_aux: bool = False) -> tuple:
    """Exact normalised loss and gradients over microbatches (a ``lax.scan`` over axis 0).

    ``loss_and_grad_fn(params, mb)`` returns ``(loss_sum, count, grads_of_loss_sum)`` — or
    ``(loss_sum, count, aux, grads)`` with ``has_aux`` — where ``loss_sum`` is the *un-normalised*
    numerator (e.g. sum of token losses, or sum of per-sequence means) and ``count`` its
    denominator (tokens, or sequences); ``ppo_math`` losses give both via ``normalize=False`` and
    ``metrics["count"]``. Returns ``(sum loss / sum count, sum grads / sum count)`` (+ ``aux``
    stacked over microbatches), i.e. exactly the full-batch gradient of the normalised loss, not a
    mean of microbatch means. Gradients are summed in float32 and returned in the params' dtypes.
    """
    acc_dtype = lambda p: jnp.promote_types(p.dtype, jnp.float32)  # noqa: E731
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype(p)), params)

    def body(carry: tuple, mb: PyTree) -> tuple:
        loss_acc, count_acc, g_acc = carry
        out = loss_and_grad_fn(params, mb)
        loss, count, grads = (out[0], out[1], out[3]) if has_aux else out
        g_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), g_acc, grads)
        carry = (loss_acc + loss.astype(jnp.float32), count_acc + jnp.asarray(count, jnp.float32), g_acc)
        return carry, (out[2] if has_aux else None)

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss, count, grads), aux = lax.scan(body, init, microbatches)
    denom = jnp.where(count > 0, count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return (loss / denom, grads, aux) if has_aux else (loss / denom, grads)


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------
def cast_for_compute(params: PyTree, dtype: Any, keep_f32: Sequence[str] = ()) -> PyTree:
    """Cast floating leaves to the compute ``dtype`` (e.g. bfloat16) for use *inside* a loss.

    Non-floating leaves are untouched; leaves whose '/'-joined path contains any of ``keep_f32``
    (e.g. ``("value_head",)``) stay as they are. Differentiable: gradients w.r.t. the original
    (float32 master) params come back in float32.
    """
    dtype = jnp.dtype(dtype)

    def cast(path: tuple, x: jax.Array) -> jax.Array:
        if not jnp.issubdtype(x.dtype, jnp.floating) or any(k in _path_str(path) for k in keep_f32):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)
