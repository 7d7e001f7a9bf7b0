"""`ModelConfig.remat` as a setting: none | layer | dots_saveable | auto (true / false of older
configs read as layer / none); every value computes the same loss and gradients, "layer" saves
compiled temporary memory."""
import dataclasses
import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax import config as config_lib
from reft_jax.model import llama
from reft_jax.model.config import REMAT_CHOICES, ModelConfig


def test_remat_values_and_old_booleans():
    assert REMAT_CHOICES == ("none", "layer", "dots_saveable", "auto")
    assert ModelConfig().remat == "none"
    assert ModelConfig(remat=True).remat == "layer" and ModelConfig(remat=False).remat == "none"
    for value in REMAT_CHOICES:
        assert ModelConfig(remat=value).remat == value
    assert dataclasses.replace(ModelConfig(), remat=True).remat == "layer"
    # an old model_config.json (remat: false) and a new one round-trip
    old = {**dataclasses.asdict(ModelConfig()), "remat": False}
    assert ModelConfig(**json.loads(json.dumps(old))).remat == "none"
    new = dataclasses.asdict(ModelConfig(remat="dots_saveable"))
    assert ModelConfig(**json.loads(json.dumps(new))).remat == "dots_saveable"
    with pytest.raises(ValueError, match=r"model\.remat must be one of none, layer, dots_saveable, auto"):
        ModelConfig(remat="full")
    # from YAML / overrides: booleans, names, and a clear error naming the key and the choices
    assert config_lib.load_config(ModelConfig, None, ["remat=true"]).remat == "layer"
    assert config_lib.load_config(ModelConfig, None, ["remat=dots_saveable"]).remat == "dots_saveable"
    with pytest.raises(config_lib.ConfigError, match=r"remat='full'.*'none', 'layer', 'dots_saveable', 'auto'"):
        config_lib.load_config(ModelConfig, None, ["remat=full"])


def _model_spec():
    for name in ("reft_jax.train.run", "reft_jax.train.common"):  # the module may move
        try:
            return importlib.import_module(name).ModelSpec
        except (ImportError, AttributeError):
            continue
    pytest.skip("ModelSpec not found")


def test_model_spec_passes_remat_to_the_model_config():
    spec_cls = _model_spec()
    for text, expected in (("true", "layer"), ("false", "none"), ("layer", "layer"), ("auto", "auto")):
        spec = config_lib.load_config(spec_cls, None, [f"remat={text}"])
        assert ModelConfig(**spec.overrides()).remat == expected
    assert ModelConfig(**spec_cls().overrides()).remat == "none"
    with pytest.raises(config_lib.ConfigError, match="remat"):
        config_lib.load_config(spec_cls, None, ["remat=everything"])


def test_remat_policy():
    assert llama.remat_policy("none") is None and llama.remat_policy("auto") is None
    assert llama.remat_policy(False) is None and llama.remat_policy(True) == "nothing"
    assert llama.remat_policy("layer") == "nothing"
    assert llama.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert llama.remat_block("none") is llama.Block


SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16)


def _loss_fn(cfg, tokens, mask):
    def loss(p):
        logits, values, _ = llama.forward(p, tokens, llama.positions_from_mask(mask), mask, cfg)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = mask[:, 1:].astype(jnp.float32)
        return (nll * w).sum() / w.sum() + 0.1 * jnp.mean(values ** 2)
    return loss


@functools.lru_cache(maxsize=None)
def _reference():
    base = ModelConfig(**SMALL)
    params = llama.init_params(base, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, base.vocab_size, size=(2, 24)).astype(np.int32))
    mask = jnp.ones(tokens.shape, bool).at[0, :4].set(False)
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(base, tokens, mask)))(params)
    return base, params, tokens, mask, loss, grads


def test_auto_traces_as_none():
    """"auto" is for the memory planner to resolve; unresolved, the model traces exactly as "none"."""
    base, params, tokens, mask, _, _ = _reference()
    auto = dataclasses.replace(base, remat="auto")
    assert str(jax.make_jaxpr(jax.grad(_loss_fn(auto, tokens, mask)))(params)) == \
        str(jax.make_jaxpr(jax.grad(_loss_fn(base, tokens, mask)))(params))


@pytest.mark.parametrize("remat", ["layer", "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients_as_none(remat):
    base, params, tokens, mask, ref_loss, ref_grads = _reference()
    cfg = dataclasses.replace(base, remat=remat)
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(cfg, tokens, mask)))(params)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        err = float(jnp.abs(g - r).max()) / max(float(jnp.abs(r).max()), 1e-30)
        assert err <= 1e-6, err


def test_layer_remat_lowers_training_temp_memory():
    """value_and_grad of the LM loss, 4 layers, 8 x 256 tokens, vocab 256 (activations dominate)."""
    base = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=32)
    params = jax.eval_shape(lambda r: llama.init_params(base, r), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    mask = jnp.ones((8, 256), bool)
    temp = {}
    for remat in ("none", "layer", "dots_saveable"):
        cfg = dataclasses.replace(base, remat=remat)
        fn = jax.jit(lambda p, t, cfg=cfg: jax.value_and_grad(_loss_fn(cfg, t, mask))(p))
        temp[remat] = fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    print("\ntemp MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in temp.items()))
    assert temp["layer"] < 0.6 * temp["none"]
    assert temp["dots_saveable"] < temp["none"]
