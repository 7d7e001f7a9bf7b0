"""Sharding: the logical rules place params on a (data, fsdp, tensor) mesh and change no numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from reft_jax import parallel
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig


def test_mesh_resolution_and_errors():
    assert parallel.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        parallel.MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_non_dividing_axis_is_replicated():
    mesh = parallel.make_mesh(parallel.MeshConfig(2, 2, 2))
    # 3 KV heads cannot split over tensor=2: that dim is replicated, the embed dim still FSDP.
    spec = parallel.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 3, 16), mesh)
    assert spec == P(None, "fsdp", None, None)
    assert parallel.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)


def test_constrain_applies_only_on_a_context_mesh():
    x = jnp.ones((8, 4, 6))
    axes = ("activation_batch", "activation_length", "activation_embed")
    assert parallel.constrain(x, axes) is x  # eager, no mesh: untouched
    f = lambda a: parallel.constrain(a * 2, axes)  # noqa: E731
    assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    jaxpr = str(jax.make_jaxpr(parallel.on_mesh_context(f, mesh))(x))
    assert "sharding_constraint" in jaxpr and "('data', 'fsdp')" in jaxpr
    one = parallel.on_mesh_context(f, parallel.single_device_mesh())
    assert "sharding_constraint" not in str(jax.make_jaxpr(one)(x))
    # Batch over data*fsdp; length and the residual's embed dim replicated.
    assert parallel.logical_to_spec(axes, x.shape, mesh) == P(("data", "fsdp"), None, None)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_forward_matches_single_device(mesh_shape):
    assert jax.device_count() == 8
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=4,
                      num_kv_heads=2, head_dim=16, num_layers=2)
    mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_shape))
    params = llama.init_params_sharded(cfg, jax.random.key(0), mesh)
    single = jax.device_put(params, jax.devices()[0])

    # Really sharded: the q kernel is split over fsdp (embed) and tensor (heads).
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    data, fsdp, tensor = mesh_shape
    assert q.sharding.spec == (P(None, "fsdp", "tensor", None) if tensor > 1 else P(None, "fsdp", None, None))
    assert q.addressable_shards[0].data.shape == (2, 64 // fsdp, 4 // tensor, 16)
    assert params["embed"]["embedding"].addressable_shards[0].data.shape == (128 // tensor, 64 // fsdp)

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, size=(8, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None, :] >= rng.integers(0, 5, size=(8, 1)))
    pos = llama.positions_from_mask(mask)
    batch_sh = parallel.batch_sharding(mesh, 2)
    # Traced on the mesh like every train step (`sharded.jit_step`): the layer constraints apply.
    fwd = jax.jit(parallel.on_mesh_context(lambda p, t, q, m: llama.forward(p, t, q, m, cfg)[:2], mesh),
                  in_shardings=(llama.param_shardings(cfg, mesh), batch_sh, batch_sh, batch_sh),
                  out_shardings=(parallel.batch_sharding(mesh, 3), batch_sh))
    sharded_logits, sharded_values = fwd(params, tokens, pos, mask)
    ref_logits, ref_values, _ = llama.forward(single, tokens, pos, mask, cfg)
    assert sharded_logits.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(ref_logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded_values), np.asarray(ref_values), atol=1e-5)
