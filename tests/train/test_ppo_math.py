"""PPO math against an independent NumPy transcription of reft_reference.md §4-§5.7.

The reference below is written from the spec text (and mirrors the official loops): masks by
"set m[:, P-1:L-1] = 1, then zero from every EOS", per-row GAE via a Python reverse
discounted cumsum, trl-style masked whitening, per-sequence token-mean losses. It works on
arrays of length L for values / masks and L-1 for log-probs, as the official code does; our
functions use length L everywhere (last column unused), which the adapters below account for.

Precision: the exact-match tests run our jnp functions in float64 (`jax.enable_x64`) and compare
at rtol 1e-9; one end-to-end test runs the jitted float32 chain and compares at 1e-5.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from reft_jax.train import ppo_math as pm

PAD = 1
RTOL64 = 1e-9
ATOL64 = 1e-10


# ----------------------------------------------------------------------------------------------
# Independent NumPy reference (loops, float64)
# ----------------------------------------------------------------------------------------------
def ref_discount_cumsum(x: np.ndarray, discount: float) -> np.ndarray:
    """y[t] = sum_k discount^k x[t+k] (what scipy.signal.lfilter computes on the reversed row)."""
    out = np.zeros_like(x, dtype=np.float64)
    running = 0.0
    for t in reversed(range(len(x))):
        running = x[t] + discount * running
        out[t] = running
    return out


def ref_mask_and_score(tokens, prompt_lens, eos_ids, scores):
    """§5.3: m[b, P-1:L-1] = 1; for each EOS at (b, e): m[b, e:] = 0, score moves to e-1."""
    B, L = tokens.shape
    mask = np.zeros((B, L), dtype=np.float64)
    score = np.zeros((B, L), dtype=np.float64)
    for b in range(B):
        P = int(prompt_lens[b])
        mask[b, P - 1 : L - 1] = 1
        score[b, L - 2] = scores[b]
        for t in range(L):  # every EOS occurrence, in order, like torch.nonzero + loop
            if int(tokens[b, t]) in eos_ids:
                mask[b, t:] = 0
                score[b, t:] = 0
                score[b, t - 1] = scores[b]
    return mask, score * mask


def ref_rollout(tokens, prompt_lens, eos_ids, scores, old_lp, ref_lp, values, kl_coef, gamma, lam):
    """§5.3-§5.5 for one batch. old_lp / ref_lp: [B, L-1]; values: [B, L]."""
    B, L = tokens.shape
    mask, score = ref_mask_and_score(tokens, prompt_lens, eos_ids, scores)
    kl = (old_lp - ref_lp) * mask[:, :-1]
    kl_rew = np.zeros((B, L))
    kl_rew[:, :-1] = -kl
    rew = score + kl_coef * kl_rew
    val = values * mask
    adv = np.zeros((B, L))
    for b in range(B):
        delta = rew[b, :-1] + gamma * val[b, 1:] - val[b, :-1]
        a = ref_discount_cumsum(delta, gamma * lam)
        a[: int(prompt_lens[b]) - 1] = 0
        adv[b, :-1] = a
    ret = adv + val
    return dict(mask=mask, score=score, kl=np.pad(kl, ((0, 0), (0, 1))), rew=rew * mask,
                val=val * mask, adv=adv * mask, ret=ret * mask)


def ref_whiten(x, mask):
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n * (n / (n - 1))
    return (x - mean) / np.sqrt(var + 1e-8)


def ref_losses(lp, old_lp, adv, v, v_old, ret, mask, clip=0.2):
    """§5.7 (lp, old_lp: [B, L-1]; the rest [B, L]). Returns (pg_loss, vf_loss)."""
    B = lp.shape[0]
    old_lp = old_lp * mask[:, :-1]  # official stores masked old log-probs
    pg_rows, vf_rows = [], []
    for b in range(B):
        n = max(mask[b].sum(), 1.0)
        s = 0.0
        for t in range(lp.shape[1]):
            ratio = math.exp(lp[b, t] - old_lp[b, t])
            l1 = -adv[b, t] * ratio
            l2 = -adv[b, t] * min(max(ratio, 1 - clip), 1 + clip)
            s += max(l1, l2) * mask[b, t]
        pg_rows.append(s / n)
        s = 0.0
        for t in range(v.shape[1]):
            vc = min(max(v[b, t], v_old[b, t] - clip), v_old[b, t] + clip)
            s += max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2) * mask[b, t]
        vf_rows.append(s / n)
    return float(np.mean(pg_rows)), 0.5 * float(np.mean(vf_rows))


# ----------------------------------------------------------------------------------------------
# Random rollout batches with the edge cases that matter
# ----------------------------------------------------------------------------------------------
def make_batch(seed, B=8, L=24, P=6, eos_ids=(2,), per_row_prompt=False):
    """Left-padded prompts + completions; rows: no EOS, EOS as first generated token, EOS at
    L-1, EOS mid-way; the EOS id cycles through all of `eos_ids`."""
    rng = np.random.default_rng(seed)
    vocab = np.array([i for i in range(3, 60) if i not in eos_ids])
    tokens = rng.choice(vocab, size=(B, L))
    prompt_lens = np.full(B, P) if not per_row_prompt else rng.integers(2, P + 1, size=B)
    for b in range(B):
        Pb = int(prompt_lens[b])
        n_left_pad = int(rng.integers(0, Pb - 1))
        tokens[b, :n_left_pad] = PAD  # left padding inside the prompt block
        kind = b % 4
        e = {0: None, 1: Pb, 2: L - 1, 3: int(rng.integers(Pb + 1, L - 1))}[kind]
        if e is not None:
            tokens[b, e] = eos_ids[b % len(eos_ids)]
            tokens[b, e + 1 :] = PAD
    return tokens, prompt_lens


def random_model_outputs(seed, B, L):
    rng = np.random.default_rng(seed + 1000)
    scores = rng.choice([0.0, 0.1, 1.0], size=B)
    old_lp = -rng.gamma(1.0, 1.0, size=(B, L - 1))
    ref_lp = old_lp + rng.normal(0, 0.3, size=(B, L - 1))
    values = rng.normal(0, 1, size=(B, L))
    return scores, old_lp, ref_lp, values


def pad_last(x):
    """[B, L-1] (official) -> [B, L] (ours: last column unused)."""
    return np.pad(x, ((0, 0), (0, 1)))


CASES = [
    dict(seed=0, eos_ids=(2,), per_row_prompt=False),
    dict(seed=1, eos_ids=(2, 7), per_row_prompt=False),
    dict(seed=2, eos_ids=(2, 7, 11), per_row_prompt=True),
]


# ----------------------------------------------------------------------------------------------
# Masks and rewards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_mask_and_score_match_reference(case):
    tokens, P = make_batch(case["seed"], eos_ids=case["eos_ids"], per_row_prompt=case["per_row_prompt"])
    scores = np.linspace(0.1, 1.0, tokens.shape[0])
    ref_m, ref_s = ref_mask_and_score(tokens, P, case["eos_ids"], scores)
    prompt_len = P if case["per_row_prompt"] else int(P[0])
    m = np.asarray(pm.action_mask(jnp.asarray(tokens), prompt_len, case["eos_ids"]))
    np.testing.assert_array_equal(m, ref_m)
    assert m.dtype == np.float32 and np.all(m[:, -1] == 0)
    s = np.asarray(pm.score_rewards(jnp.asarray(scores, jnp.float32), jnp.asarray(m)))
    np.testing.assert_allclose(s, ref_s, rtol=1e-6)
    # Row kinds: 0 no EOS (ends at L-2), 1 EOS first generated token (single action P-1).
    Pb = P[1] if case["per_row_prompt"] else P[0]
    assert m[0, -2] == 1 and s[0, -2] == pytest.approx(scores[0])
    assert m[1].sum() == 1 and m[1, Pb - 1] == 1 and s[1, Pb - 1] == pytest.approx(scores[1])


def test_action_mask_ignores_eos_inside_prompt():
    """Deviation from the official recipe (documented): EOS ids in the prompt block (e.g. a
    tokenizer whose pad == eos used for left padding) do not cut the completion."""
    tokens = np.array([[2, 2, 5, 6, 7, 8, 2, 2], [5, 6, 7, 8, 9, 9, 9, 9]])
    m = np.asarray(pm.action_mask(jnp.asarray(tokens), 4, (2,)))
    np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0]])


def test_action_mask_under_jit_with_array_eos_ids():
    tokens, P = make_batch(3, eos_ids=(2, 7))
    f = jax.jit(pm.action_mask)
    m = f(jnp.asarray(tokens), jnp.asarray(P), jnp.asarray([2, 7]))
    ref_m, _ = ref_mask_and_score(tokens, P, (2, 7), np.zeros(len(P)))
    np.testing.assert_array_equal(np.asarray(m), ref_m)


# ----------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# ----------------------------------------------------------------------------------------------
def test_kl_estimator_values():
    lp, rp = jnp.log(0.5), jnp.log(0.25)
    assert np.isclose(pm.kl_k1(lp, rp), math.log(2))
    assert np.isclose(pm.kl_k2(lp, rp), 0.5 * math.log(2) ** 2)
    assert np.isclose(pm.kl_k3(lp, rp), math.log(2) - 0.5)
    assert set(pm.KL_ESTIMATORS) >= {"k1", "k2", "k3"}
    # k1 and k3 are unbiased for KL(p || q) under sampling from p; k3 is non-negative.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7))
    q = rng.dirichlet(np.ones(7))
    exact = float(np.sum(p * np.log(p / q)))
    for name in ("k1", "k3"):
        vals = np.asarray(pm.KL_ESTIMATORS[name](jnp.log(p), jnp.log(q)))
        assert np.isclose(np.sum(p * vals), exact, rtol=1e-5), name
    assert np.all(np.asarray(pm.kl_k3(jnp.log(p), jnp.log(q))) >= 0)


@pytest.mark.parametrize("case", CASES)
def test_rewards_gae_returns_match_reference_x64(case):
    tokens, P = make_batch(case["seed"], eos_ids=case["eos_ids"], per_row_prompt=case["per_row_prompt"])
    B, L = tokens.shape
    scores, old_lp, ref_lp, values = random_model_outputs(case["seed"], B, L)
    beta, gamma, lam = 0.05, 1.0, 0.95
    ref = ref_rollout(tokens, P, case["eos_ids"], scores, old_lp, ref_lp, values, beta, gamma, lam)
    with jax.enable_x64(True):
        m = pm.action_mask(jnp.asarray(tokens), jnp.asarray(P), case["eos_ids"], dtype=jnp.float64)
        s = pm.score_rewards(jnp.asarray(scores), m)
        r, kl = pm.token_rewards(s, jnp.asarray(pad_last(old_lp)), jnp.asarray(pad_last(ref_lp)), m, beta)
        adv, ret = pm.gae(r, jnp.asarray(values), m, gamma=gamma, lam=lam)
        assert adv.dtype == jnp.float64
        for name, ours in dict(score=s, kl=kl, rew=r, adv=adv, ret=ret).items():
            np.testing.assert_allclose(np.asarray(ours), ref[name], rtol=RTOL64, atol=ATOL64, err_msg=name)


def test_gae_general_gamma_lambda_x64():
    tokens, P = make_batch(4, eos_ids=(2,))
    B, L = tokens.shape
    scores, old_lp, ref_lp, values = random_model_outputs(4, B, L)
    ref = ref_rollout(tokens, P, (2,), scores, old_lp, ref_lp, values, 0.01, 0.9, 0.7)
    with jax.enable_x64(True):
        adv, ret = pm.gae(jnp.asarray(ref["rew"]), jnp.asarray(values), jnp.asarray(ref["mask"]), 0.9, 0.7)
    np.testing.assert_allclose(np.asarray(adv), ref["adv"], rtol=RTOL64, atol=ATOL64)
    np.testing.assert_allclose(np.asarray(ret), ref["ret"], rtol=RTOL64, atol=ATOL64)


def test_kl_in_loss_mode_reward_is_score_only():
    tokens, P = make_batch(5)
    B, L = tokens.shape
    scores, old_lp, ref_lp, _ = random_model_outputs(5, B, L)
    m = pm.action_mask(jnp.asarray(tokens), int(P[0]), (2,))
    s = pm.score_rewards(jnp.asarray(scores, jnp.float32), m)
    r, kl = pm.token_rewards(s, jnp.asarray(pad_last(old_lp), jnp.float32),
                             jnp.asarray(pad_last(ref_lp), jnp.float32), m, 0.05, kl_in_reward=False)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(s))
    assert float(jnp.abs(kl).sum()) > 0  # still reported for logging
    # The loss-side KL term: masked k3, per-sequence token-mean then batch mean.
    lp, rp = jnp.asarray(pad_last(old_lp), jnp.float32), jnp.asarray(pad_last(ref_lp), jnp.float32)
    loss, metrics = pm.kl_loss(lp, rp, m, estimator="k3")
    k3 = np.exp(pad_last(ref_lp) - pad_last(old_lp)) - 1 - (pad_last(ref_lp) - pad_last(old_lp))
    mm = np.asarray(m)
    want = np.mean((k3 * mm).sum(1) / np.maximum(mm.sum(1), 1))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    g = jax.grad(lambda x: pm.kl_loss(x, rp, m)[0])(lp)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[mm == 0] == 0)


# ----------------------------------------------------------------------------------------------
# Whitening
# ----------------------------------------------------------------------------------------------
def test_whiten_matches_reference_x64():
    tokens, P = make_batch(6, B=8)
    B, L = tokens.shape
    ref_m, _ = ref_mask_and_score(tokens, P, (2,), np.zeros(B))
    x = np.random.default_rng(6).normal(2.0, 3.0, size=(B, L)) * ref_m
    with jax.enable_x64(True):
        w = pm.whiten(jnp.asarray(x), jnp.asarray(ref_m))
    np.testing.assert_allclose(np.asarray(w), ref_whiten(x, ref_m), rtol=RTOL64, atol=ATOL64)


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("data",))


def test_whiten_sharded_over_8_devices_equals_single_device():
    assert len(jax.devices()) >= 8
    tokens, P = make_batch(7, B=16, L=32)
    m = pm.action_mask(jnp.asarray(tokens), int(P[0]), (2,))
    x = jnp.asarray(np.random.default_rng(7).normal(size=tokens.shape), jnp.float32) * m
    single = np.asarray(jax.jit(pm.whiten)(x, m))
    np.testing.assert_allclose(single, ref_whiten(np.asarray(x, np.float64), np.asarray(m, np.float64)),
                               rtol=1e-5, atol=1e-5)
    mesh = _mesh()
    shard = NamedSharding(mesh, PS("data"))
    xs, ms = jax.device_put(x, shard), jax.device_put(m, shard)
    gspmd = jax.jit(pm.whiten, out_shardings=shard)(xs, ms)
    assert len(gspmd.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(gspmd), single, rtol=1e-6, atol=1e-6)
    # Explicit collective form (shard_map / pmap style): each shard sees 2 rows.
    smap = jax.jit(jax.shard_map(lambda a, b: pm.whiten(a, b, axis_name="data"), mesh=mesh,
                                 in_specs=(PS("data"), PS("data")), out_specs=PS("data")))
    np.testing.assert_allclose(np.asarray(smap(xs, ms)), single, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def _loss_inputs(seed):
    tokens, P = make_batch(seed, eos_ids=(2, 7), per_row_prompt=True)
    B, L = tokens.shape
    scores, old_lp, ref_lp, values = random_model_outputs(seed, B, L)
    ref = ref_rollout(tokens, P, (2, 7), scores, old_lp, ref_lp, values, 0.05, 1.0, 0.95)
    rng = np.random.default_rng(seed + 7)
    lp = old_lp + rng.normal(0, 0.3, size=old_lp.shape)  # ratios well outside [0.8, 1.2]
    v_new = ref["val"] + rng.normal(0, 0.4, size=values.shape)
    adv = ref_whiten(ref["adv"], ref["mask"])
    return ref, old_lp, lp, v_new, adv


def test_policy_and_value_loss_match_reference_x64():
    ref, old_lp, lp, v_new, adv = _loss_inputs(8)
    want_pg, want_vf = ref_losses(lp, old_lp, adv, v_new, ref["val"], ref["ret"], ref["mask"])
    with jax.enable_x64(True):
        m = jnp.asarray(ref["mask"])
        pg, pgm = pm.policy_loss(jnp.asarray(pad_last(lp)), jnp.asarray(pad_last(old_lp)), jnp.asarray(adv), m)
        vf, vfm = pm.value_loss(jnp.asarray(v_new), jnp.asarray(ref["val"]), jnp.asarray(ref["ret"]), m)
    np.testing.assert_allclose(float(pg), want_pg, rtol=RTOL64)
    np.testing.assert_allclose(float(vf), want_vf, rtol=RTOL64)
    # Metrics: clip fractions are fractions of masked tokens where the clipped branch wins.
    mk = ref["mask"][:, :-1] > 0
    ratio = np.exp(lp - old_lp)
    a = adv[:, :-1]
    frac = np.mean((-a * np.clip(ratio, 0.8, 1.2) > -a * ratio)[mk])
    np.testing.assert_allclose(float(pgm["clipfrac"]), frac, rtol=1e-9)
    assert 0 < float(pgm["clipfrac"]) < 1 and 0 < float(vfm["clipfrac"]) < 1
    assert float(pgm["approx_kl"]) > 0
    np.testing.assert_allclose(float(pgm["count"]), ref["mask"].shape[0])


def test_token_mean_aggregation_and_sum_mode():
    ref, old_lp, lp, v_new, adv = _loss_inputs(9)
    m = ref["mask"]
    ratio = np.exp(lp - old_lp)
    a = adv[:, :-1]
    tok = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2)) * m[:, :-1]
    with jax.enable_x64(True):
        args = (jnp.asarray(pad_last(lp)), jnp.asarray(pad_last(old_lp)), jnp.asarray(adv), jnp.asarray(m))
        tm, metrics = pm.policy_loss(*args, loss_agg="token_mean")
        total, metrics_sum = pm.policy_loss(*args, loss_agg="token_mean", normalize=False)
        vsum, vmet = pm.value_loss(jnp.asarray(v_new), jnp.asarray(ref["val"]), jnp.asarray(ref["ret"]),
                                   jnp.asarray(m), loss_agg="token_mean", normalize=False)
        vmean, _ = pm.value_loss(jnp.asarray(v_new), jnp.asarray(ref["val"]), jnp.asarray(ref["ret"]),
                                 jnp.asarray(m), loss_agg="token_mean")
    np.testing.assert_allclose(float(tm), tok.sum() / m.sum(), rtol=RTOL64)
    np.testing.assert_allclose(float(total), tok.sum(), rtol=RTOL64)
    np.testing.assert_allclose(float(metrics_sum["count"]), m.sum())
    np.testing.assert_allclose(float(vsum) / float(vmet["count"]), float(vmean), rtol=RTOL64)
    with pytest.raises(ValueError):
        pm.policy_loss(*[jnp.zeros((2, 4))] * 4, loss_agg="nope")


def test_log_ratio_clamp_guard():
    B, L = 2, 6
    m = jnp.array([[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]], jnp.float32)
    adv = jnp.ones((B, L))
    old = jnp.full((B, L), -2.0)
    # Garbage outside the mask (what an unmasked position may hold) must not poison grads.
    old = old.at[:, 4:].set(-1e9)
    lp = jnp.full((B, L), -2.0).at[0, 1].set(100.0)  # log-ratio 102 on a real token
    loss, metrics = pm.policy_loss(lp, old, -adv, m)
    g = jax.grad(lambda x: pm.policy_loss(x, old, -adv, m)[0])(lp)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[np.asarray(m) == 0] == 0)
    assert float(metrics["log_ratio_clamped_frac"]) == pytest.approx(1 / 5)
    # Row 0: (e^20 [clamped from e^102] + 1 + 1) / 3 tokens; row 1: (1 + 1) / 2; batch mean.
    assert float(loss) == pytest.approx(((math.exp(20) + 2) / 3 + 1) / 2, rel=1e-6)
    # The default clamp is wide enough that ordinary values are untouched (checked against the
    # unclamped reference in test_policy_and_value_loss_match_reference_x64); None disables it.
    loss_none, _ = pm.policy_loss(lp.at[0, 1].set(0.0), old, adv, m, log_ratio_clamp=None)
    assert np.isfinite(float(loss_none))


def test_entropy_explained_variance_and_token_logprobs():
    rng = np.random.default_rng(10)
    B, L, V = 3, 7, 11
    logits = rng.normal(0, 2, size=(B, L, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, L))
    m = np.zeros((B, L), np.float32)
    m[:, 2:5] = 1
    m[2, 5] = 1
    # entropy: masked mean of -sum p log p at the action positions
    ent = []
    for b in range(B):
        for t in range(L):
            if m[b, t]:
                z = logits[b, t].astype(np.float64)
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                ent.append(-(p * np.log(p)).sum())
    np.testing.assert_allclose(float(pm.entropy_from_logits(jnp.asarray(logits), jnp.asarray(m))),
                               np.mean(ent), rtol=1e-5)
    # token_logprobs: column t = log softmax(logits[t])[tokens[t+1]], last column 0
    lp = np.asarray(pm.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    for b in range(B):
        for t in range(L - 1):
            z = logits[b, t].astype(np.float64)
            want = z[tokens[b, t + 1]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
            assert lp[b, t] == pytest.approx(want, abs=1e-5)
    assert np.all(lp[:, -1] == 0)
    # explained variance: 1 - var(ret - v) / var(ret), masked unbiased variances
    v = rng.normal(size=(B, L))
    ret = v + rng.normal(0, 0.5, size=(B, L))
    sel = m > 0
    want = 1 - np.var((ret - v)[sel], ddof=1) / (np.var(ret[sel], ddof=1) + 1e-8)
    got = pm.explained_variance(jnp.asarray(v, jnp.float32), jnp.asarray(ret, jnp.float32), jnp.asarray(m))
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Advantage estimators and the full chain
# ----------------------------------------------------------------------------------------------
def test_group_estimators_match_loops():
    n, G, L = 4, 3, 10
    B = n * G
    rng = np.random.default_rng(11)
    scores = rng.choice([0.0, 0.1, 1.0], size=B)
    m = np.zeros((B, L))
    for b in range(B):
        m[b, 3 : 3 + int(rng.integers(1, 7))] = 1
    rew = np.zeros((B, L))
    for b in range(B):
        rew[b, np.nonzero(m[b])[0][-1]] = scores[b]
    want_grpo = np.zeros(B)
    want_rloo = np.zeros(B)
    for g in range(G):
        s = scores[g * n : (g + 1) * n]
        for i in range(n):
            want_grpo[g * n + i] = (s[i] - s.mean()) / (s.std(ddof=1) + 1e-4)
            want_rloo[g * n + i] = s[i] - (s.sum() - s[i]) / (n - 1)
    with jax.enable_x64(True):
        for name, want in (("grpo", want_grpo), ("rloo", want_rloo)):
            adv, ret = pm.ADVANTAGE_ESTIMATORS[name](jnp.asarray(rew), jnp.zeros((B, L)), jnp.asarray(m),
                                                     gamma=1.0, lam=0.95, group_size=n)
            np.testing.assert_allclose(np.asarray(adv), want[:, None] * m, rtol=1e-9, atol=1e-12, err_msg=name)
            # returns: reward-to-go inside the mask (Monte-Carlo, gamma=1)
            np.testing.assert_allclose(np.asarray(ret), scores[:, None] * m, atol=1e-12)
    with pytest.raises(ValueError):
        pm.ADVANTAGE_ESTIMATORS["rloo"](jnp.asarray(rew), jnp.zeros((B, L)), jnp.asarray(m),
                                        gamma=1.0, lam=0.95, group_size=5)
    assert "gae" in pm.ADVANTAGE_ESTIMATORS


def test_compute_advantages_float32_jit_matches_reference():
    tokens, P = make_batch(12, B=8, L=40, eos_ids=(2, 7), per_row_prompt=True)
    B, L = tokens.shape
    scores, old_lp, ref_lp, values = random_model_outputs(12, B, L)
    ref = ref_rollout(tokens, P, (2, 7), scores, old_lp, ref_lp, values, 0.05, 1.0, 0.95)
    f = jax.jit(pm.compute_advantages, static_argnames=("eos_ids", "kl_estimator", "kl_in_reward",
                                                       "advantage_estimator", "group_size", "whiten_advantages"))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = f(jnp.asarray(tokens), jnp.asarray(P), f32(scores), f32(pad_last(old_lp)), f32(pad_last(ref_lp)),
            f32(values), eos_ids=(2, 7), kl_coef=0.05)
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    for name, want in (("score_rewards", ref["score"]), ("kl", ref["kl"]), ("rewards", ref["rew"]),
                       ("values", ref["val"]), ("raw_advantages", ref["adv"]), ("returns", ref["ret"])):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), want, rtol=1e-5, atol=1e-5, err_msg=name)
    want_adv = ref_whiten(ref["adv"], ref["mask"]) * ref["mask"]
    np.testing.assert_allclose(np.asarray(out.advantages), want_adv, rtol=1e-5, atol=1e-5)
    # GRPO through the same entry point: group-normalised sequence scores, no whitening.
    out_g = f(jnp.asarray(tokens), jnp.asarray(P), f32(scores), f32(pad_last(old_lp)), f32(pad_last(ref_lp)),
              f32(values), eos_ids=(2, 7), kl_coef=0.0, advantage_estimator="grpo", group_size=4, whiten_advantages=False)
    s = scores.reshape(2, 4)
    want = ((s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(np.asarray(out_g.advantages), want[:, None] * ref["mask"], rtol=1e-5, atol=1e-5)
