"""Rotary position embeddings with the scaling kinds the Llama family uses.

Frequencies follow transformers' `ROPE_INIT_FUNCTIONS` (default, linear, llama3, yarn) so imported
checkpoints see exactly the positions they were trained with; layout is HF's `rotate_half`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from reft_jax.model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2], attention scaling of cos/sin)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    # float32 like transformers, so long positions rotate by the same angles.
    inv = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "default":
        return inv, 1.0
    factor = float(s["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        low = float(s.get("low_freq_factor", 1.0))
        high = float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = s.get("original_max_position_embeddings") or cfg.max_position_embeddings

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = s.get("attention_factor")
        if attn is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
            else:
                attn = mscale(factor)
        beta_fast = s.get("beta_fast") or 32
        beta_slow = s.get("beta_slow") or 1

        def correction_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        inv = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
        return inv, float(attn)
    raise ValueError(f"unsupported rope type {kind!r}")


def rope_cos_sin(positions: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, T, head_dim] (float32) for integer positions [B, T]."""
    inv, scale = inv_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, heads, head_dim]; rotation in float32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
