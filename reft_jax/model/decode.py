"""The model's one-token decode step, for the sampler: the same numerics as `llama.forward`, op for
op, laid out for speed (tests pin it to a teacher-forced `forward`).

Why a decode step of its own instead of calling `llama.forward` per token: on CPU a decode step
is dominated by per-op overhead and memory traffic, not FLOPs. The scanned model slices every
layer's weights and cache out of stacked arrays each step (a copy of the whole model and cache
per token) and its cache layout [B, S, KV, hd] forces a transpose for the attention dots. Here
the weights are split per layer, cast to the compute dtype and fused (q|k|v, gate|up) once per
call, the layer loop is unrolled, and each layer's cache is its own [B, KV, S, hd] buffer
(measured on the 2-core CPU at batch 32, f32: ~60 ms per step against ~280 ms for the scanned
model called in a while loop). It lives next to the model it must match.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from reft_jax.model.config import ModelConfig
from reft_jax.model.rope import apply_rope, rope_cos_sin

Array = jax.Array
NEG_INF = -1e30  # the model's finite mask value (fully masked dummy rows stay NaN-free)

class Layer(NamedTuple):
    """One layer's weights, fused and in the compute dtype, for the decode step."""

    in_norm: Array  # [D]
    qkv: Array  # [D, (H + 2KV) * hd]
    qkv_bias: Array | None  # [(H + 2KV) * hd]
    o: Array  # [H * hd, D]
    post_norm: Array  # [D]
    gate_up: Array  # [D, 2F]
    down: Array  # [F, D]


class Weights(NamedTuple):
    layers: tuple[Layer, ...]
    embed: Array  # [V, D] compute dtype (input embedding)
    head: Array  # [V, D] when tied, else [D, V]; see `decode_weights` for its dtype
    final_norm: Array  # [D]


def decode_weights(params: Any, cfg: ModelConfig) -> Weights:
    """Split, cast and fuse once per call, outside the loop: slices of the stacked weights
    taken inside the loop would be copied every step."""
    dt = jnp.dtype(cfg.dtype)
    lp, a = params["layers"], params["layers"]["attn"]
    n = cfg.num_layers
    d = cfg.hidden_size
    qkv = jnp.concatenate([a[name]["kernel"].reshape(n, d, -1) for name in ("q_proj", "k_proj", "v_proj")],
                          axis=-1).astype(dt)
    bias = None
    if cfg.attention_bias:
        bias = jnp.concatenate([a[name]["bias"].reshape(n, -1) for name in ("q_proj", "k_proj", "v_proj")],
                               axis=-1).astype(dt)
    o = a["o_proj"]["kernel"].reshape(n, -1, d).astype(dt)
    gate_up = jnp.concatenate([lp["mlp"]["gate_proj"]["kernel"], lp["mlp"]["up_proj"]["kernel"]], -1).astype(dt)
    down = lp["mlp"]["down_proj"]["kernel"].astype(dt)
    in_norm = lp["input_norm"]["scale"].astype(dt)
    post_norm = lp["post_attn_norm"]["scale"].astype(dt)
    layers = tuple(
        Layer(in_norm[i], qkv[i], None if bias is None else bias[i], o[i], post_norm[i], gate_up[i], down[i])
        for i in range(n))
    emb = params["embed"]["embedding"]
    head = emb if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    # The model's logits are float32 products of the hidden state (compute dtype) and the head.
    # When the head is stored in the compute dtype, a compute-dtype dot accumulating in float32
    # gives the same products (exact in float32) at half the bytes: 2x faster in bf16 on CPU.
    head = head if head.dtype == dt else head.astype(jnp.float32)
    return Weights(layers, emb.astype(dt), head, params["final_norm"]["scale"].astype(dt))


def cache_dtype(cfg: ModelConfig):
    """Storage dtype of the decode cache: the compute dtype, except float32 on CPU. XLA's CPU
    backend runs these batched bf16 attention dots by converting both operands to float32, i.e.
    a full conversion of every layer's cache every step (measured: it cancels bf16's gain);
    float32 storage of the same bf16-rounded values reads fewer bytes than that and gives the
    same numbers. Accelerators keep the compute dtype."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(cfg.dtype)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * xf.astype(x.dtype)  # as the model: back to x's dtype before the weight


def mm(x: Array, w: Array) -> Array:
    """x @ w accumulated in float32, rounded to x's dtype. For bf16 this is what the model's
    bf16 einsum computes on accelerators; on XLA CPU a plain bf16 dot takes a slow path (~48
    GFLOP/s at 32 rows) while bf16 x bf16 -> f32 runs at ~410 (measured, 2-core EPYC)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def decode_step(w: Weights, cfg: ModelConfig, tok: Array, pos: Array, ks, vs, slot_mask: Array,
                 slot: Array):
    """One token per row through the model: float32 logits [R, V] and the updated caches.

    ks/vs: per-layer [R, KV, S, hd]; the new keys go to `slot`; `slot_mask` [R, S] already marks it.
    """
    dt = jnp.dtype(cfg.dtype)
    r = tok.shape[0]
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // kv
    x = jnp.take(w.embed, tok, axis=0)  # [R, D]
    cos, sin = rope_cos_sin(pos[:, None], cfg)  # [R, 1, hd]
    # The mask as an additive bias built once per step: scores + 0 and scores + -1e30 are exactly
    # the model's where(mask, scores, -1e30) (|scores| is far below -1e30's ulp), but XLA CPU
    # fuses a per-layer `where` on a broadcast bool mask badly: ~8 ms a step at batch 32.
    bias = jnp.where(slot_mask, 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(w.layers, ks, vs):
        y = rms_norm(x, layer.in_norm, cfg.rms_norm_eps)
        qkv = mm(y, layer.qkv)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qkv = qkv.reshape(r, 1, h + 2 * kv, hd)
        q = apply_rope(qkv[:, :, :h], cos, sin)
        k = apply_rope(qkv[:, :, h:h + kv], cos, sin)
        v = qkv[:, :, h + kv:]
        # values are rounded to the compute dtype, whatever the cache's storage (`cache_dtype`)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.reshape(r, kv, 1, hd).astype(k_cache.dtype),
                                               (0, 0, slot, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.reshape(r, kv, 1, hd).astype(k_cache.dtype),
                                               (0, 0, slot, 0))
        new_k.append(k_cache)
        new_v.append(v_cache)
        at = k_cache.dtype  # attention dots run in the storage dtype, accumulating in float32
        scores = jnp.einsum("rkgd,rksd->rkgs", q.reshape(r, kv, g, hd).astype(at), k_cache,
                            preferred_element_type=jnp.float32) * (hd ** -0.5)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(dt).astype(at)
        att = jnp.einsum("rkgs,rksd->rkgd", probs, v_cache, preferred_element_type=jnp.float32)
        att = att.astype(dt).reshape(r, h * hd)
        x = x + mm(att, layer.o)
        y = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
        gate, up = jnp.split(mm(y, layer.gate_up), 2, axis=-1)
        x = x + mm(jax.nn.silu(gate) * up, layer.down)
    y = rms_norm(x, w.final_norm, cfg.rms_norm_eps).astype(w.head.dtype)
    logits = jnp.einsum("rd,vd->rv" if cfg.tie_word_embeddings else "rd,dv->rv", y, w.head,
                        preferred_element_type=jnp.float32)
    return logits, tuple(new_k), tuple(new_v)
