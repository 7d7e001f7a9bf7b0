"""Model invariants that need no reference implementation (parity lives in test_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax.model import llama
from reft_jax.model.config import ModelConfig


def _left_padded_batch(cfg, lengths, total, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, size=(len(lengths), total)).astype(np.int32)
    mask = np.zeros((len(lengths), total), bool)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = True
        tokens[i, : total - n] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_kv_cache_decode_equals_full_forward_left_padded(tied, bias):
    cfg = ModelConfig(tie_word_embeddings=tied, attention_bias=bias, architecture="Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
    params = llama.init_params(cfg, jax.random.key(0))
    tokens, mask = _left_padded_batch(cfg, [3, 9, 6, 12], 12)
    pos = llama.positions_from_mask(mask)
    full_logits, full_values, _ = llama.forward(params, tokens, pos, mask, cfg)

    prefill = 5
    cache = llama.init_cache(cfg, 4, 16)
    step = jax.jit(lambda p, t, q, m, c: llama.forward(p, t, q, m, cfg, c))
    logits, values, cache = step(params, tokens[:, :prefill], pos[:, :prefill], mask[:, :prefill], cache)
    outs, vals = [logits], [values]
    for t in range(prefill, tokens.shape[1]):
        logits, values, cache = step(params, tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(logits)
        vals.append(values)
    dec_logits = np.asarray(jnp.concatenate(outs, axis=1))
    dec_values = np.asarray(jnp.concatenate(vals, axis=1))
    m = np.asarray(mask)
    assert np.abs(dec_logits - np.asarray(full_logits))[m].max() <= 1e-4
    assert np.abs(dec_values - np.asarray(full_values))[m].max() <= 1e-4
    assert int(cache.index) == tokens.shape[1]


def test_left_padding_is_exact():
    """A left-padded row gives the same logits as the same tokens unpadded."""
    cfg = ModelConfig()
    params = llama.init_params(cfg, jax.random.key(1))
    tokens, mask = _left_padded_batch(cfg, [5], 9)
    pos = llama.positions_from_mask(mask)
    padded, _, _ = llama.forward(params, tokens, pos, mask, cfg)
    real = tokens[:, 4:]
    alone, _, _ = llama.forward(params, real, llama.positions_from_mask(jnp.ones_like(real, bool)),
                                jnp.ones_like(real, bool), cfg)
    np.testing.assert_allclose(np.asarray(padded[:, 4:]), np.asarray(alone), atol=1e-5)


def test_outputs_float32_and_bf16_close():
    cfg32 = ModelConfig()
    cfg16 = ModelConfig(dtype="bfloat16")
    params = llama.init_params(cfg32, jax.random.key(2))
    tokens, mask = _left_padded_batch(cfg32, [6, 8], 8)
    pos = llama.positions_from_mask(mask)
    l32, v32, _ = llama.forward(params, tokens, pos, mask, cfg32)
    l16, v16, _ = llama.forward(params, tokens, pos, mask, cfg16)
    assert l16.dtype == jnp.float32 and v16.dtype == jnp.float32
    assert np.abs(np.asarray(l16 - l32)).max() < 0.1 * np.abs(np.asarray(l32)).max() + 0.05


def test_param_count_and_logical_axes_match_tree():
    cfg = ModelConfig(num_layers=3)
    params = llama.init_params(cfg, jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.num_params()
    axes = llama.logical_axes(cfg)
    for (path, leaf), (_, ax) in zip(jax.tree_util.tree_leaves_with_path(params),
                                     jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(ax) == leaf.ndim, (path, ax, leaf.shape)
    assert axes["layers"]["attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads", "head_dim")


def test_value_head_init_options():
    zero = llama.init_params(ModelConfig(value_head_init="zeros"), jax.random.key(0))["value_head"]
    assert not np.any(np.asarray(zero["kernel"]))
    rand = llama.init_params(ModelConfig(), jax.random.key(0))["value_head"]["kernel"]
    bound = ModelConfig().hidden_size ** -0.5
    assert 0 < np.abs(np.asarray(rand)).max() <= bound


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        ModelConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "num_attention_heads": 2})
