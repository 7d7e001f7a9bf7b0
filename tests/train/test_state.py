"""TrainState, optimizer, LR schedules (against transformers + torch), exact gradient accumulation
and bf16-compute / f32-master casting. torch is a test-only reference here."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from reft_jax.train import ppo_math as pm
from reft_jax.train import state as st


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
def _hf_lrs(make_sched, lr, steps):
    """LR used by the k-th optimizer step (k = 0..steps-1) under an HF LambdaLR schedule."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("total,ratio,override", [(50, 0.1, None), (37, 0.1, None), (10, 0.0, None),
                                                  (20, 0.1, 7)])
def test_linear_warmup_decay_matches_transformers(total, ratio, override):
    cfg = st.OptimConfig(lr=1e-5, schedule="linear_warmup_decay", warmup_ratio=ratio, warmup_steps=override)
    warm = override if override is not None else int(ratio * total)
    assert st.num_warmup_steps(cfg, total) == warm
    want = _hf_lrs(lambda o: transformers.get_linear_schedule_with_warmup(o, warm, total), 1e-5, total + 5)
    sched = st.make_schedule(cfg, total)
    got = np.array([float(sched(k)) for k in range(total + 5)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-13)
    assert got[0] == 0.0 or warm == 0  # HF's first update runs at lr 0 during warm-up
    assert np.all(got[total:] == 0)


def test_reft_gsm8k_ncot_warmup_anchor():
    """§6: GSM8K N-CoT SFT: (ceil(7473/3)//8*40)//2 = 6220 steps, warm-up 622; LR ~5e-6 at 312."""
    total = (-(-7473 // 3) // 8 * 40) // 2
    cfg = st.OptimConfig(lr=1e-5)
    assert (total, st.num_warmup_steps(cfg, total)) == (6220, 622)
    assert float(st.make_schedule(cfg, total)(312)) == pytest.approx(1e-5 * 312 / 622, rel=1e-6)


def test_constant_schedules_match_transformers():
    cfg = st.OptimConfig(lr=3e-7, schedule="constant")  # ReFT RL: warm-up ignored
    want = _hf_lrs(lambda o: transformers.get_constant_schedule_with_warmup(o, 0), 3e-7, 12)
    np.testing.assert_allclose([float(st.make_schedule(cfg, 10)(k)) for k in range(12)], want, rtol=1e-6)
    cfg = st.OptimConfig(lr=3e-7, schedule="constant_with_warmup", warmup_ratio=0.3)
    want = _hf_lrs(lambda o: transformers.get_constant_schedule_with_warmup(o, 3), 3e-7, 12)
    np.testing.assert_allclose([float(st.make_schedule(cfg, 10)(k)) for k in range(12)], want, rtol=1e-6)
    with pytest.raises(ValueError):
        st.OptimConfig(schedule="cosine")


# ----------------------------------------------------------------------------------------------
# Optimizer vs torch AdamW + clip_grad_norm_ + HF schedule, and the state update
# ----------------------------------------------------------------------------------------------
def _params(rng):
    return {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                      "bias": rng.normal(size=(3,)).astype(np.float32)},
            "norm": {"scale": (1 + 0.1 * rng.normal(size=(3,))).astype(np.float32)}}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_optimizer_matches_torch_adamw(wd):
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [jax.tree.map(lambda p: (3.0 * rng.normal(size=p.shape)).astype(np.float32), params)
             for _ in range(8)]
    total, cfg = 20, st.OptimConfig(lr=1e-2, warmup_ratio=0.25, weight_decay=wd, clip_norm=1.0)

    tp = {k: {n: torch.nn.Parameter(torch.tensor(v)) for n, v in d.items()} for k, d in params.items()}
    decay = [tp["dense"]["kernel"]]
    no_decay = [tp["dense"]["bias"], tp["norm"]["scale"]]  # ReFT's "bias"/"LayerNorm.weight" group
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    sched = transformers.get_linear_schedule_with_warmup(opt, st.num_warmup_steps(cfg, total), total)

    tx = st.make_optimizer(cfg, total)
    state = st.TrainState.create(jax.tree.map(jnp.asarray, params), tx, jax.random.key(0))
    step = jax.jit(st.apply_gradients, static_argnums=2, donate_argnums=0)
    for g in grads:
        for k, d in tp.items():
            for n, p in d.items():
                p.grad = torch.tensor(g[k][n])
        torch.nn.utils.clip_grad_norm_([p for d in tp.values() for p in d.values()], 1.0)
        opt.step()
        sched.step()
        state = step(state, jax.tree.map(jnp.asarray, g), tx)
        for k, d in tp.items():
            for n, p in d.items():
                np.testing.assert_allclose(np.asarray(state.params[k][n]), p.detach().numpy(),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{k}/{n}")
    assert int(state.step) == len(grads)


def test_weight_decay_mask_skips_bias_and_norm_scales():
    params = jax.tree.map(jnp.asarray, _params(np.random.default_rng(1)))
    tx = st.make_optimizer(st.OptimConfig(lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=None), 10)
    state = st.TrainState.create(params, tx, jax.random.key(0))
    new = st.apply_gradients(state, jax.tree.map(jnp.zeros_like, params), tx)  # pure decay step
    np.testing.assert_allclose(new.params["dense"]["kernel"], params["dense"]["kernel"] * (1 - 0.05), rtol=1e-6)
    np.testing.assert_array_equal(new.params["dense"]["bias"], params["dense"]["bias"])
    np.testing.assert_array_equal(new.params["norm"]["scale"], params["norm"]["scale"])


def test_train_state_is_a_pytree():
    params = {"w": jnp.ones((2, 2))}
    tx = st.make_optimizer(st.OptimConfig(), 10)
    s = st.TrainState.create(params, tx, jax.random.key(3))
    leaves = jax.tree.leaves(s)
    assert any(x is s.step for x in leaves) and s.step.dtype == jnp.int32 and int(s.step) == 0
    s2 = jax.tree.map(lambda x: x, s)
    assert isinstance(s2, st.TrainState) and dataclasses.fields(s2)
    cfg = st.OptimConfig(grad_accum=2)
    assert cfg.grad_accum == 2
    with pytest.raises(ValueError):
        st.OptimConfig(grad_accum=0)


# ----------------------------------------------------------------------------------------------
# Exact gradient accumulation
# ----------------------------------------------------------------------------------------------
def _linear_data(seed, N=8, T=6, D=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, T, D)).astype(np.float32)
    y = rng.normal(size=(N, T)).astype(np.float32)
    m = np.zeros((N, T), np.float32)
    for i in range(N):  # very different token counts per row
        m[i, : 1 + (i * 5) % T] = 1
    params = {"w": jnp.asarray(rng.normal(size=(D,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return params, {"x": jnp.asarray(x), "y": jnp.asarray(y), "m": jnp.asarray(m)}


def _tok_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return (pred - batch["y"]) ** 2


def test_accumulate_gradients_equals_full_batch_token_mean():
    params, batch = _linear_data(0)

    def full(p):
        return jnp.sum(_tok_loss(p, batch) * batch["m"]) / jnp.sum(batch["m"])

    want_loss, want_g = jax.value_and_grad(full)(params)

    def sum_loss(p, mb):
        return jnp.sum(_tok_loss(p, mb) * mb["m"]), (jnp.sum(mb["m"]), jnp.sum(mb["m"], -1))

    def loss_and_grad(p, mb):
        (s, (count, per_row)), g = jax.value_and_grad(sum_loss, has_aux=True)(p, mb)
        return s, count, per_row, g

    micro = st.split_microbatches(batch, 4)
    assert micro["x"].shape == (4, 2, 6, 3)
    loss, g, aux = jax.jit(lambda p, mb: st.accumulate_gradients(loss_and_grad, p, mb, has_aux=True))(params, micro)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(want_g[k]), rtol=1e-5, atol=1e-7)
    assert aux.shape == (4, 2) and float(aux.sum()) == float(batch["m"].sum())
    # The naive mean of per-microbatch means is a different (wrong) number here.
    naive = np.mean([float(full_mb) for full_mb in
                     (jnp.sum(_tok_loss(params, jax.tree.map(lambda a: a[i], micro)) * micro["m"][i])
                      / jnp.sum(micro["m"][i]) for i in range(4))])
    assert abs(naive - float(want_loss)) > 1e-3


def test_accumulate_gradients_exact_for_reft_seq_mean_policy_loss():
    """Microbatching the ReFT loss (per-sequence token-mean, batch mean) through ppo_math's
    (sum, count) form equals the full-minibatch loss and gradients."""
    rng = np.random.default_rng(2)
    B, L = 8, 10
    m = np.zeros((B, L), np.float32)
    for i in range(B):
        m[i, 2 : 3 + i] = 1
    data = {"old": jnp.asarray(-rng.gamma(1.0, 1.0, (B, L)), jnp.float32),
            "adv": jnp.asarray(rng.normal(size=(B, L)), jnp.float32), "m": jnp.asarray(m)}
    params = {"shift": jnp.asarray(rng.normal(0, 0.3, (B, L)), jnp.float32)}

    def logp(p, mb, rows):
        return mb["old"] + p["shift"][rows]

    full = lambda p: pm.policy_loss(logp(p, data, slice(None)), data["old"], data["adv"], data["m"])[0]  # noqa: E731
    want_loss, want_g = jax.value_and_grad(full)(params)

    data_idx = dict(data, rows=jnp.arange(B))
    micro = st.split_microbatches(data_idx, 2)

    def loss_and_grad(p, mb):
        def f(p):
            s, met = pm.policy_loss(logp(p, mb, mb["rows"]), mb["old"], mb["adv"], mb["m"], normalize=False)
            return s, met["count"]
        (s, count), g = jax.value_and_grad(f, has_aux=True)(p)
        return s, count, g

    loss, g = st.accumulate_gradients(loss_and_grad, params, micro)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g["shift"]), np.asarray(want_g["shift"]), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# bf16 compute, f32 master params
# ----------------------------------------------------------------------------------------------
def test_cast_for_compute_bf16_with_f32_master():
    params, batch = _linear_data(1)
    mixed = dict(params, step_count=jnp.asarray(3, jnp.int32), value_head={"kernel": jnp.ones((3,))})
    cast = st.cast_for_compute(mixed, jnp.bfloat16, keep_f32=("value_head",))
    assert cast["w"].dtype == jnp.bfloat16 and cast["b"].dtype == jnp.bfloat16
    assert cast["step_count"].dtype == jnp.int32 and cast["value_head"]["kernel"].dtype == jnp.float32
    assert st.cast_for_compute(params, "float32")["w"].dtype == jnp.float32

    def loss(p, dtype):
        q = st.cast_for_compute(p, dtype)
        tok = _tok_loss(q, jax.tree.map(lambda a: a.astype(dtype), batch))
        return jnp.sum(tok.astype(jnp.float32) * batch["m"]) / jnp.sum(batch["m"])

    g16 = jax.grad(loss)(params, jnp.bfloat16)
    g32 = jax.grad(loss)(params, jnp.float32)
    assert g16["w"].dtype == jnp.float32  # gradients arrive at the f32 master params in f32
    np.testing.assert_allclose(np.asarray(g16["w"]), np.asarray(g32["w"]), rtol=5e-2, atol=5e-2)
    assert not np.array_equal(np.asarray(g16["w"]), np.asarray(g32["w"]))  # really computed in bf16
