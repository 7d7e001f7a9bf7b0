"""The device-side PPO step against a direct, unjitted composition of the model and ppo_math."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reft_jax import parallel
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.train import ppo_math as pm
from reft_jax.train import ppo_step as ps
from reft_jax.train import sharded
from reft_jax.train.state import OptimConfig, TrainState, apply_gradients, make_optimizer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
PAD, EOS = 0, 2
STEP = ps.PPOAlgoConfig()  # ReFT's objective, passed whole as the trainer passes its PPOConfig
EOS_IDS = (EOS,)


def _rollout(B=8, P=5, L=16, seed=0) -> dict[str, np.ndarray]:
    """Left-padded prompts of varying length, completions with EOS at varying places (one row
    without EOS: length-capped), pads after EOS."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, L), PAD, np.int32)
    attn = np.zeros((B, L), bool)
    for b in range(B):
        n_prompt = int(rng.integers(2, P + 1))
        tokens[b, P - n_prompt:P] = rng.integers(3, 64, n_prompt)
        attn[b, P - n_prompt:P] = True
        n_comp = L - P if b == 0 else int(rng.integers(1, L - P))
        tokens[b, P:P + n_comp] = rng.integers(3, 64, n_comp)
        if b != 0:
            tokens[b, P + n_comp - 1] = EOS
        attn[b, P:P + n_comp] = True
    return {"tokens": tokens, "attention_mask": attn, "prompt_len": np.full((B,), P, np.int32)}


_init = jax.jit(lambda key: llama.init_params(CFG, key))


def _params(seed=0):
    return _init(jax.random.key(seed))


def _ppo_batch(params, ref, rollout, cfg=STEP, seed=0):
    scores = jnp.asarray(np.random.default_rng(seed).choice([0.0, 0.1, 1.0], len(rollout["tokens"])),
                         jnp.float32)
    scored = jax.jit(lambda p, r, ro: ps.score_pass(p, r, ro, CFG, cfg, eos_ids=EOS_IDS))(params, ref, rollout)
    batch, stats = jax.jit(lambda s, ro, sc: ps.assemble(s, ro, sc, cfg, eos_ids=EOS_IDS))(scored, rollout, scores)
    return scored, batch, stats


def _perturbed(params, scale=0.05, seed=1):
    """Params a little away from the rollout policy, so ratios differ from 1 and clip."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _direct_loss(params, batch, cfg=STEP):
    """pg + vf_coef * vf straight from the model and ppo_math, unjitted, normalised."""
    logits, values, _ = llama.forward(params, batch["tokens"], llama.positions_from_mask(batch["attention_mask"]),
                                      batch["attention_mask"], CFG)
    logp = pm.token_logprobs(logits, batch["tokens"])
    m = batch["mask"]
    pg, _ = pm.policy_loss(logp, batch["logp_old"], batch["advantages"], m, cfg.clip, loss_agg=cfg.loss_agg)
    vf, _ = pm.value_loss(values, batch["values_old"], batch["returns"], m, cfg.value_clip, loss_agg=cfg.loss_agg)
    total = pg + cfg.vf_coef * vf
    if not cfg.kl_in_reward:
        total = total + cfg.kl_coef * pm.kl_loss(logp, batch["logp_ref"], m, cfg.kl_estimator,
                                                 loss_agg=cfg.loss_agg)[0]
    return total


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


_forward = jax.jit(lambda p, ro: llama.forward(p, ro["tokens"], llama.positions_from_mask(ro["attention_mask"]),
                                                ro["attention_mask"], CFG)[:2])
_direct_grad = jax.jit(jax.value_and_grad(_direct_loss), static_argnums=2)
TX = make_optimizer(OptimConfig(lr=1e-2, schedule="constant"), 10)


@functools.cache
def _loss_and_grads(cfg_items: tuple, grad_accum: int = 1):
    return jax.jit(ps.make_loss_and_grads(CFG, ps.PPOAlgoConfig(**dict(cfg_items)), grad_accum=grad_accum))


@functools.cache
def _update(cfg_items: tuple, grad_accum: int = 1):
    return jax.jit(ps.make_ppo_update(CFG, TX, ps.PPOAlgoConfig(**dict(cfg_items)), grad_accum=grad_accum))


def items(cfg: ps.PPOAlgoConfig) -> tuple:
    """A hashable key of a config (the compiled steps are cached per config)."""
    return tuple(sorted(dataclasses.asdict(cfg).items()))


@pytest.fixture(scope="module")
def rollout_batch():
    params, ref = _params(0), _params(7)
    ro = _rollout()
    scored, batch, stats = _ppo_batch(params, ref, ro)
    return params, ref, ro, scored, batch, stats


# ----------------------------------------------------------------------------------------------
def test_score_pass_is_a_full_forward_in_the_action_convention(rollout_batch):
    params, ref, ro, scored, batch, stats = rollout_batch
    logits, values = _forward(params, ro)
    m = pm.action_mask(jnp.asarray(ro["tokens"]), ro["prompt_len"], (EOS,))
    np.testing.assert_allclose(scored["logp_old"], pm.token_logprobs(logits, ro["tokens"]) * m, atol=1e-5)
    np.testing.assert_allclose(scored["values"], values, atol=1e-5)
    ref_logits, _ = _forward(ref, ro)
    np.testing.assert_allclose(scored["logp_ref"], pm.token_logprobs(ref_logits, ro["tokens"]) * m, atol=1e-5)
    np.testing.assert_allclose(stats["entropy"], pm.entropy_from_logits(logits, m), rtol=1e-5)
    # Row blocks (memory) change nothing.
    blocked = jax.jit(lambda p, r, x: ps.score_pass(p, r, x, CFG, dataclasses.replace(STEP, score_microbatches=4),
                                                    eos_ids=EOS_IDS))(params, ref, ro)
    _assert_trees_close(blocked, scored, atol=1e-6)
    # The batch is compute_advantages on the score pass; row 0 (no EOS) runs to L-2.
    assert batch["mask"][0, -2] == 1 and batch["mask"][0, -1] == 0
    assert float(stats["response_length"]) == float(np.asarray(m).sum(-1).mean())


def test_sampler_logprobs_option_replaces_only_the_old_logprobs(rollout_batch):
    params, _, ro, _, _, _ = rollout_batch
    ro = dict(ro, sampler_logp=np.full(ro["tokens"].shape, -0.5, np.float32))
    cfg = dataclasses.replace(STEP, sampler_logprobs=True)
    scored = jax.jit(lambda p, x: ps.score_pass(p, p, x, CFG, cfg, eos_ids=EOS_IDS))(params, ro)
    m = np.asarray(pm.action_mask(jnp.asarray(ro["tokens"]), ro["prompt_len"], (EOS,)))
    np.testing.assert_allclose(scored["logp_old"], -0.5 * m)
    np.testing.assert_allclose(scored["values"], _forward(params, ro)[1], atol=1e-5)


ACCUM = 4  # microbatches of the update


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean"])
def test_update_loss_and_grads_equal_direct_composition_and_accumulate_exactly(rollout_batch, loss_agg):
    """jax.grad of pg + vf_coef * vf written out directly on the whole minibatch == the step's
    exact accumulation over 4 strided microbatches: loss, gradients and token-weighted metrics."""
    cfg = dataclasses.replace(STEP, loss_agg=loss_agg)
    params, _, _, _, batch, _ = rollout_batch
    theta = _perturbed(params)
    want_loss, want_g = _direct_grad(theta, batch, cfg)
    loss, grads, met = _loss_and_grads(items(cfg), ACCUM)(theta, batch)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    _assert_trees_close(grads, want_g, rtol=1e-4, atol=1e-6)
    assert 0 < float(met["pg_clipfrac"]) < 1  # the perturbation really exercises the clip
    np.testing.assert_allclose(float(met["pg_loss"]) + cfg.vf_coef * float(met["vf_loss"]), float(loss), rtol=1e-5)
    _, _, whole = jax.jit(lambda p, b: ps.loss_terms(p, b, CFG, cfg))(theta, batch)  # one block
    for k in ("pg_loss", "vf_loss", "pg_clipfrac", "approx_kl", "ratio_mean", "vf_clipfrac", "value_mean"):
        np.testing.assert_allclose(float(met[k]), float(whole[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def test_kl_in_loss_mode_adds_the_kl_term(rollout_batch):
    cfg = dataclasses.replace(STEP, kl_in_reward=False, kl_estimator="k3", kl_coef=0.3)
    params, _, _, _, batch, _ = rollout_batch
    want = jax.jit(_direct_loss, static_argnums=2)(params, batch, cfg)
    loss, _, aux = jax.jit(lambda p, b: ps.loss_terms(p, b, CFG, cfg))(params, batch)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert float(aux["kl_loss"]) > 0


@pytest.fixture(scope="module")
def updated(rollout_batch):
    """One update from perturbed params (single device): (state before, state after, metrics)."""
    params, _, _, _, batch, _ = rollout_batch
    state = TrainState.create(_perturbed(params), TX, jax.random.key(0))
    new, met = _update(items(STEP), ACCUM)(state, batch)
    return state, new, met


def test_update_step_applies_the_optimizer_and_skips_nonfinite_losses(rollout_batch, updated):
    _, _, _, _, batch, _ = rollout_batch
    state, new, met = updated
    _, grads, _ = _loss_and_grads(items(STEP), ACCUM)(state.params, batch)
    want = apply_gradients(state, grads, TX)
    _assert_trees_close(new.params, want.params, rtol=1e-6, atol=1e-7)
    assert int(new.step) == 1 and int(met["nonfinite"]) == 0
    np.testing.assert_allclose(float(met["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-5)
    # A NaN anywhere in the loss: no update at all, and the flag is raised.
    bad = dict(batch, advantages=batch["advantages"].at[1, 6].set(jnp.nan))
    same, met = _update(items(STEP), ACCUM)(state, bad)
    assert int(met["nonfinite"]) == 1 and int(same.step) == 0
    _assert_trees_close(same.params, state.params, rtol=0, atol=0)


def test_reference_is_a_separate_copy_and_value_head_can_be_zeroed():
    mesh = parallel.single_device_mesh()
    params = sharded.place(_params(0), mesh)
    ref = ps.make_reference(params, "bfloat16")
    assert ref["embed"]["embedding"].dtype == jnp.bfloat16
    ref32 = ps.make_reference(params)
    assert ref32["embed"]["embedding"] is not params["embed"]["embedding"]
    jax.jit(lambda p: jax.tree.map(lambda a: a * 0, p), donate_argnums=0)(params)  # consume params
    assert np.isfinite(np.asarray(ref32["embed"]["embedding"])).all()  # still alive
    z = ps.zero_value_head(_params(0))
    assert not np.asarray(z["value_head"]["kernel"]).any() and not np.asarray(z["value_head"]["bias"]).any()


def test_step_on_8_devices_equals_one_device(rollout_batch, updated):
    """Score pass -> assemble (global whitening) -> update on data 2 x fsdp 2 x tensor 2, with
    row blocks and accumulation, equals the single-device results."""
    params, ref, ro, scored1, batch1, stats1 = rollout_batch
    state1, new1, met1 = updated
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = dataclasses.replace(STEP, score_microbatches=2)
    shard = lambda tree: sharded.place(jax.device_get(tree), mesh)  # noqa: E731
    p8 = jax.device_put(jax.device_get(params), llama.param_shardings(CFG, mesh))
    r8 = jax.device_put(jax.device_get(ref), llama.param_shardings(CFG, mesh))
    ro8 = parallel.shard_batch(ro, mesh)
    scores = jnp.asarray(np.random.default_rng(0).choice([0.0, 0.1, 1.0], len(ro["tokens"])), jnp.float32)
    scored = jax.jit(lambda p, r, x: ps.score_pass(p, r, x, CFG, cfg, eos_ids=EOS_IDS))(p8, r8, ro8)
    batch, stats = jax.jit(lambda s, x, sc: ps.assemble(s, x, sc, cfg, eos_ids=EOS_IDS))(
        scored, ro8, parallel.shard_batch(scores, mesh))
    assert batch["advantages"].sharding.spec[0] == ("data", "fsdp")
    _assert_trees_close(batch, batch1, rtol=1e-4, atol=2e-5)
    for k in stats1:
        np.testing.assert_allclose(stats[k], stats1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    state = shard(state1)
    state = state.replace(params=jax.device_put(jax.device_get(state1.params), llama.param_shardings(CFG, mesh)))
    state = sharded.place(TrainState.create(state.params, TX, jax.random.key(0)), mesh)
    new, met = sharded.jit_step(ps.make_ppo_update(CFG, TX, cfg, grad_accum=2), state, batch, mesh)(state, batch)
    for k in met1:
        np.testing.assert_allclose(met[k], met1[k], rtol=2e-4, atol=1e-5, err_msg=k)
    _assert_trees_close(new.params, new1.params, rtol=1e-4, atol=1e-5)
