"""Chunked log-prob head (`reft_jax.model.logprobs`) against the plain, unchunked computation:
`llama.forward`'s float32 logits, then `jax.nn.log_softmax` / softmax written out here."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax.model import llama, logprobs
from reft_jax.model.config import ModelConfig

RTOL = 1e-5


def _cfg(**kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16)
    return ModelConfig(**{**base, **kw})


def _batch(cfg, b=3, t=37, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[0, :5] = False  # a left-padded row
    mask[1, t - 7:] = False  # a right-padded row
    return jnp.asarray(tokens), jnp.asarray(mask)


# --- references: the whole [B, T, V] float32 logits, written out --------------------------------
def _ref_logits(params, tokens, mask, cfg):
    logits, values, _ = llama.forward(params, tokens, llama.positions_from_mask(mask), mask, cfg)
    return logits, values


def _ref_aligned(logits, targets):
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, ent


def _ref_action(logits, tokens):
    logp, ent = _ref_aligned(logits[:, :-1], tokens[:, 1:])
    full_ent = _ref_aligned(logits, jnp.zeros(tokens.shape, jnp.int32))[1]
    return jnp.concatenate([logp, jnp.zeros_like(logp[:, :1])], axis=1), full_ent


def _close(actual, desired, rtol=RTOL):
    """Elementwise, relative to the largest magnitude of the reference (per array)."""
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        assert a.shape == d.shape
        scale = max(np.abs(d).max(), 1e-30)
        err = np.abs(a - d).max() / scale
        assert err <= rtol, f"relative error {err:.3g} > {rtol:g} (shape {d.shape})"


def _sft_inputs(tokens, mask):
    targets = jnp.roll(tokens, -1, axis=1)
    w = (mask & jnp.roll(mask, -1, axis=1)).astype(jnp.float32).at[:, -1].set(0)
    return targets, w


@functools.lru_cache(maxsize=None)
def _setup(tied):
    """(cfg, params, tokens, mask, reference logits, reference values): one compile per `tied`."""
    cfg = _cfg(tie_word_embeddings=tied)
    params = llama.init_params(cfg, jax.random.key(0))
    tokens, mask = _batch(cfg)
    logits, values = jax.jit(lambda p: _ref_logits(p, tokens, mask, cfg))(params)
    return cfg, params, tokens, mask, logits, values


# --- values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_and_logprobs_match_unchunked(tied):
    """`hidden_states` + `lm_head_matrix` are `forward` without its head; log-probs / entropies
    for T = 37 in chunks of 5 and 8 (padded to 40), 37 and 100 (one chunk) and None."""
    cfg, params, tokens, mask, logits, values = _setup(tied)
    hidden, values2 = jax.jit(lambda p: llama.hidden_states(p, tokens, llama.positions_from_mask(mask),
                                                            mask, cfg))(params)
    assert hidden.shape == (*tokens.shape, cfg.hidden_size) and hidden.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(values2), np.asarray(values))  # bit for bit
    w = llama.lm_head_matrix(params, cfg)
    assert w.shape == (cfg.hidden_size, cfg.vocab_size)
    _close(hidden @ w, logits)

    targets = jnp.roll(tokens, -1, axis=1)
    ref_aligned = _ref_aligned(logits, targets)
    for chunk in (5, 8, 37, 100, None):
        aligned = jax.jit(lambda h, w, t: logprobs.token_logprobs(h, w, t, chunk=chunk, with_entropy=True))
        _close(aligned(hidden, w, targets), ref_aligned)
    assert logprobs.token_logprobs(hidden, w, targets, chunk=8)[1] is None

    ref_action = _ref_action(logits, tokens)
    for chunk in (8, None):
        policy = jax.jit(lambda p: logprobs.policy_logprobs(p, tokens, mask, cfg, chunk=chunk, with_entropy=True))
        logp, v, ent = policy(params)
        _close((logp, ent), ref_action)
        assert np.all(np.asarray(logp[:, -1]) == 0)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(values))


def test_bf16_compute_head_stays_float32():
    """Under a bfloat16 compute dtype the head still multiplies float32 copies, as forward does."""
    cfg = _cfg(dtype="bfloat16")
    params = llama.init_params(cfg, jax.random.key(3))
    tokens, mask = _batch(cfg)
    logits, _ = jax.jit(lambda p: _ref_logits(p, tokens, mask, cfg))(params)
    logp, _, ent = jax.jit(lambda p: logprobs.policy_logprobs(p, tokens, mask, cfg, chunk=8, with_entropy=True))(params)
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    _close((logp, ent), _ref_action(logits, tokens))


def test_bad_chunk_is_refused():
    h, w, t = jnp.zeros((1, 4, 8)), jnp.zeros((8, 10)), jnp.zeros((1, 4), jnp.int32)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk"):
            logprobs.token_logprobs(h, w, t, chunk=bad)


# --- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_sft_and_ppo_losses_value_and_grad(tied):
    """Two losses, differentiated w.r.t. every param (one jacrev, so one compile per side):
    the SFT token-mean NLL, and a PPO-style loss reading logp (clipped ratio), values and
    the entropy under an action mask. Chunk 8 over T = 37."""
    cfg, params, tokens, mask, _, _ = _setup(tied)
    targets, w = _sft_inputs(tokens, mask)
    rng = np.random.default_rng(5)
    adv = jnp.asarray(rng.normal(size=tokens.shape).astype(np.float32))
    logp_old = jnp.asarray(rng.normal(-5.0, 0.1, size=tokens.shape).astype(np.float32))
    m = (mask & jnp.roll(mask, -1, axis=1)).astype(jnp.float32).at[:, -1].set(0).at[:, :10].set(0)

    def ppo_loss(logp, values, ent):
        ratio = jnp.exp(logp - logp_old)
        pg = -(jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv) * m).sum() / m.sum()
        return pg + 0.5 * ((values - adv) ** 2 * m).sum() / m.sum() - 0.01 * (ent * m).sum() / m.sum()

    def ref_losses(p):
        logits, values = _ref_logits(p, tokens, mask, cfg)
        sft = -(_ref_aligned(logits, targets)[0] * w).sum() / w.sum()
        logp, ent = _ref_action(logits, tokens)
        return jnp.stack([sft, ppo_loss(logp, values, ent)])

    def chunked_losses(p):
        hidden, values = llama.hidden_states(p, tokens, llama.positions_from_mask(mask), mask, cfg)
        head = llama.lm_head_matrix(p, cfg)
        nll, count = logprobs.nll_sum(hidden, head, targets, w, chunk=8)
        logp, ent = logprobs.action_logprobs(hidden, head, tokens, chunk=8, with_entropy=True)
        return jnp.stack([nll / count, ppo_loss(logp, values, ent)])

    value_and_jac = lambda f: jax.jit(lambda p: (f(p), jax.jacrev(f)(p)))  # noqa: E731
    ref_val, ref_jac = value_and_jac(ref_losses)(params)
    val, jac = value_and_jac(chunked_losses)(params)
    for i in range(2):  # each loss on its own scale
        _close(val[i], ref_val[i])
        _close(jax.tree.map(lambda g: g[i], jac), jax.tree.map(lambda g: g[i], ref_jac))
    # the PPO path as one call gives the same loss
    _close(jax.jit(lambda p: ppo_loss(*logprobs.policy_logprobs(p, tokens, mask, cfg, chunk=8,
                                                                with_entropy=True)))(params), ref_val[1])


def _shapes_in_jaxpr(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        out += [v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape")]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out += _shapes_in_jaxpr(sub)
    return out


def test_verifier_path_needs_no_vocab_logits():
    """The verifier (train/verifier.py `verifier_logits`) reads `llama.forward_hidden` at the last
    real token and a [D, 2] head: no array with a vocabulary-sized last axis exists, forward or
    backward (besides the param-shaped zero gradient of the unused lm_head, [D, V]);
    `forward_hidden` is `hidden_states`' hidden in float32."""
    cfg = _cfg(vocab_size=317)
    params = llama.init_params(cfg, jax.random.key(0))
    tokens, mask = _batch(cfg)
    pos = llama.positions_from_mask(mask)
    head = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 2))
    last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)

    def verifier_loss(p):
        h = llama.forward_hidden(p, tokens, pos, mask, cfg)
        x = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0] @ head
        return -jax.nn.log_softmax(x)[:, 1].sum()

    jaxpr = jax.make_jaxpr(jax.value_and_grad(verifier_loss))(params).jaxpr
    vocab_last = {s for s in _shapes_in_jaxpr(jaxpr) if s and s[-1] == cfg.vocab_size}
    assert vocab_last <= {(cfg.hidden_size, cfg.vocab_size)}, vocab_last  # only lm_head's (zero) grad
    hidden, _ = llama.hidden_states(params, tokens, pos, mask, cfg)
    np.testing.assert_array_equal(np.asarray(llama.forward_hidden(params, tokens, pos, mask, cfg)),
                                  np.asarray(hidden.astype(jnp.float32)))


# --- memory -----------------------------------------------------------------------------------
def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_head_temp_memory_far_below_unchunked():
    """vocab 32k, B 4, T 512, chunk 128: the unchunked gradient holds several [4, 512, 32000] f32
    arrays (250 MiB each); the chunked one a few [4, 128, 32000]."""
    v, b, t, d, chunk = 32_000, 4, 512, 256, 128
    hidden = jnp.zeros((b, t, d))
    w = jnp.zeros((d, v))
    tokens = jnp.zeros((b, t), jnp.int32)

    def unchunked(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        logp, ent = _ref_action(logits, tokens)
        return logp.sum() + ent.sum()

    def chunked(h, w):
        logp, ent = logprobs.action_logprobs(h, w, tokens, chunk=chunk, with_entropy=True)
        return logp.sum() + ent.sum()

    grad = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
    full = _temp_bytes(grad(unchunked), hidden, w)
    part = _temp_bytes(grad(chunked), hidden, w)
    fwd_full = _temp_bytes(unchunked, hidden, w)
    fwd_part = _temp_bytes(chunked, hidden, w)
    print(f"\ntemp MiB: value+grad unchunked {full / 2**20:.1f}, chunked {part / 2**20:.1f} "
          f"({full / part:.1f}x); forward only unchunked {fwd_full / 2**20:.1f}, chunked {fwd_part / 2**20:.1f}")
    logits_bytes = b * t * v * 4
    assert full >= logits_bytes  # the reference does hold the whole logits
    assert part < logits_bytes  # measured: 192 MiB (~3 chunks of logits) against 1,250 MiB
    assert part * 4 < full
    assert fwd_part * 4 < fwd_full  # measured: 127 MiB against 750 MiB
