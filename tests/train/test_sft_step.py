"""The pure SFT step: exact token-mean loss, accumulation-invariant, mesh-invariant."""
import jax
import jax.numpy as jnp
import numpy as np

from reft_jax import parallel
from reft_jax.data.batches import Encoded, pad_sft_batch
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.train import sharded
from reft_jax.train.sft_step import make_sft_step, sequence_nll
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        p, t = rng.integers(2, 6), rng.integers(2, 9)
        items.append(Encoded(rng.integers(3, 64, size=p + t).astype(np.int32), int(p)))
    return pad_sft_batch(items, 16, pad_id=0, batch_size=n)


def test_padding_weights_mark_exactly_the_target_tokens():
    b = pad_sft_batch([Encoded(np.array([5, 6, 7, 8, 2], np.int32), 2)], 8, pad_id=0, batch_size=2)
    # positions 1..3 predict tokens 7, 8, 2 (EOS trained); dummy row has no weight.
    np.testing.assert_array_equal(b["loss_weights"][0], [0, 1, 1, 1, 0, 0, 0, 0])
    assert b["loss_weights"][1].sum() == 0 and not b["attention_mask"][1].any()


def test_nll_is_token_mean_of_numpy_cross_entropy():
    params = llama.init_params(CFG, jax.random.key(0))
    batch = _batch()
    nll, count = sequence_nll(params, jax.tree.map(jnp.asarray, batch), CFG)
    logits, _, _ = llama.forward(params, batch["tokens"], llama.positions_from_mask(batch["attention_mask"]),
                                 batch["attention_mask"], CFG)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ref = 0.0
    for b in range(8):
        for t in range(15):
            if batch["loss_weights"][b, t]:
                ref -= logp[b, t, batch["tokens"][b, t + 1]]
    assert count == batch["loss_weights"].sum()
    np.testing.assert_allclose(float(nll), ref, rtol=1e-5)


def _run(mesh, grad_accum, steps=5):
    tx = make_optimizer(OptimConfig(lr=3e-3, schedule="constant"), total_steps=steps)
    params = llama.init_params_sharded(CFG, jax.random.key(0), mesh)
    state = sharded.place(jax.jit(lambda p: TrainState.create(p, tx, jax.random.key(1)))(params), mesh)
    batch = parallel.shard_batch(_batch(), mesh)
    step = sharded.jit_step(make_sft_step(CFG, tx, grad_accum), state, batch, mesh)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


def test_loss_falls_and_accumulation_and_mesh_change_nothing():
    one = parallel.single_device_mesh()
    base, p_base = _run(one, 1)
    assert base[-1] < base[0] - 0.1
    accum, p_acc = _run(one, 4)
    np.testing.assert_allclose(accum, base, rtol=1e-5)
    mesh8 = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    eight, p8 = _run(mesh8, 2)
    np.testing.assert_allclose(eight, base, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_base), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _numpy_logp(params, batch):
    logits, _, _ = llama.forward(params, batch["tokens"], llama.positions_from_mask(batch["attention_mask"]),
                                 batch["attention_mask"], CFG)
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _group_means(params, batch, k):
    """NumPy: the token mean of each non-empty group; group j = rows j, j + B/k, ..."""
    logp, w = _numpy_logp(params, batch), batch["loss_weights"]
    n = len(w) // k
    out = []
    for j in range(n):
        rows = range(j, len(w), n)
        count = sum(w[b].sum() for b in rows)
        if count:
            out.append(sum(-logp[b, t, batch["tokens"][b, t + 1]] for b in rows for t in range(15) if w[b, t]) / count)
    return out


def test_loss_group_is_the_mean_of_group_token_means_as_reft():
    """ReFT's SFT loss: HF's token mean per micro-batch of k examples, averaged over micro-batches
    (DeepSpeed over GPUs and accumulation steps). NumPy reference; an all-padding group (a short
    last batch) counts for nothing; accumulation changes nothing."""
    params = llama.init_params(CFG, jax.random.key(0))
    padded = _batch(n=6)
    padded["loss_weights"][1::2] = 0  # group 1 of 2 (rows 1, 3, 5) is padding only
    padded["attention_mask"][1::2] = False
    got, groups = sequence_nll(params, jax.tree.map(jnp.asarray, padded), CFG, group=3)
    ref = _group_means(params, padded, 3)
    assert int(groups) == len(ref) == 1
    np.testing.assert_allclose(float(got), ref[0], rtol=1e-5)

    full = _batch(n=6)
    got2, groups2 = sequence_nll(params, jax.tree.map(jnp.asarray, full), CFG, group=2)
    ref2 = _group_means(params, full, 2)
    assert int(groups2) == len(ref2) == 3
    np.testing.assert_allclose(float(got2), sum(ref2), rtol=1e-5)
    # group = the whole batch is the global token mean; a mean of group means differs from it
    tok, count = sequence_nll(params, jax.tree.map(jnp.asarray, full), CFG)
    whole, one = sequence_nll(params, jax.tree.map(jnp.asarray, full), CFG, group=6)
    np.testing.assert_allclose(float(whole) / float(one), float(tok) / float(count), rtol=1e-6)
    assert abs(float(got2) / 3 - float(tok) / float(count)) > 1e-4

    mesh = parallel.single_device_mesh()
    tx = make_optimizer(OptimConfig(lr=3e-3, schedule="constant"), total_steps=1)
    losses = []
    for accum in (1, 3):
        state = sharded.place(jax.jit(lambda p: TrainState.create(p, tx, jax.random.key(1)))(
            llama.init_params_sharded(CFG, jax.random.key(0), mesh)), mesh)
        placed = parallel.shard_batch(full, mesh)
        step = sharded.jit_step(make_sft_step(CFG, tx, accum, loss_group=2), state, placed, mesh)
        losses.append(float(step(state, placed)[1]["loss"]))  # the state is donated: a fresh one each
    np.testing.assert_allclose(losses, [sum(ref2) / 3] * 2, rtol=1e-5)
