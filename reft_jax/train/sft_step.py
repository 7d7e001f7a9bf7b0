"""The SFT loss and the pure SFT train step.

Loss = token-mean cross-entropy over target tokens (prompt masked, EOS trained, right padding),
exactly HF's causal-LM loss over a batch. With gradient accumulation the mean is taken over the
tokens of the whole global batch, not averaged per micro-batch, so accumulation changes nothing.
``loss_group=k`` instead averages the token means of groups of k consecutive examples: ReFT's
loss, HF's per-micro-batch mean on each GPU (3 examples) averaged by DeepSpeed over GPUs and
accumulation steps, so a short example weighs more than in the global token mean.
The log-probs go through the chunked head (`model/logprobs.py`): never `[B, T, V]` float32
logits for a whole micro-batch, recomputed chunk by chunk in the backward pass.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from reft_jax.model import llama, logprobs
from reft_jax.model.config import ModelConfig
from reft_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, cast_for_compute,
                                   split_microbatches)


def sequence_nll(params: Any, batch: dict[str, jax.Array], config: ModelConfig,
                 chunk: int | None = logprobs.DEFAULT_CHUNK, group: int | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens) for a right-padded batch; the head
    runs over `chunk` positions at a time (None: all at once). With `group=k`: (sum of the
    token means of groups of k rows, number of groups with a target token). Group j of a batch
    of B rows is rows j, j + B/k, j + 2B/k, ...: strided like `state.split_microbatches`, so a
    micro-batch holds whole groups and accumulation does not change which rows share one."""
    tokens, mask = batch["tokens"], batch["attention_mask"]
    hidden, _ = llama.hidden_states(params, tokens, llama.positions_from_mask(mask), mask, config)
    targets = jnp.roll(tokens, -1, axis=1)  # position t predicts t+1; the wrapped last column has weight 0
    head = llama.lm_head_matrix(params, config)
    if group is None:
        return logprobs.nll_sum(hidden, head, targets, batch["loss_weights"], chunk=chunk)
    logp, _ = logprobs.token_logprobs(hidden, head, targets, chunk=chunk)
    w = batch["loss_weights"].astype(jnp.float32)
    nll = (-(logp * w).sum(axis=1)).reshape(group, -1).sum(axis=0)
    count = w.sum(axis=1).reshape(group, -1).sum(axis=0)
    return (nll / jnp.maximum(count, 1.0)).sum(), (count > 0).sum()


def make_sft_step(config: ModelConfig, tx: optax.GradientTransformation, grad_accum: int = 1,
                  compute_dtype: str | None = None, chunk: int | None = logprobs.DEFAULT_CHUNK,
                  loss_group: int | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`; batch leaves are [global_batch, T].

    The batch is split into `grad_accum` micro-batches (a `lax.scan`: activation memory of one)
    and the loss is the token mean over the whole batch (or, with `loss_group`, the mean of the
    groups' token means). `compute_dtype` casts params for the forward only, so float32 master
    params stay in the state.
    """

    def loss_and_grad(params, mb):
        def loss_sum(p):
            p = cast_for_compute(p, compute_dtype) if compute_dtype else p
            return sequence_nll(p, mb, config, chunk, loss_group)

        (nll, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
        return nll, count, grads

    def step(state: TrainState, batch: dict[str, jax.Array]):
        loss, grads = accumulate_gradients(loss_and_grad, state.params, split_microbatches(batch, grad_accum))
        new_state = apply_gradients(state, grads, tx)
        metrics = {
            "loss": loss,
            "tokens": batch["loss_weights"].sum(),
            "grad_norm": optax.global_norm(grads),
        }
        return new_state, metrics

    return step
