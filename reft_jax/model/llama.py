"""Flax (linen) decoder for the Llama family with a scalar value head and a KV cache.

One module serves SFT, sampling, PPO scoring and the verifier:
  * layers are `nn.scan`-stacked (one compiled layer body, params with a leading `layers` axis);
  * every param carries logical axis names, mapped to the mesh only by `reft_jax.parallel`;
  * positions are passed in (from the mask), so left-padded rows see the same positions as
    unpadded ones;
  * each layer's input and output (the residual stream) is constrained to the batch axes when
    traced on a mesh (`parallel.constrain`): GSPMD does not infer that under FSDP;
  * logits and values are float32 whatever the compute dtype.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reft_jax.model.config import ModelConfig, normalize_remat
from reft_jax.model.rope import apply_rope, rope_cos_sin
from reft_jax.parallel import constrain

Array = jax.Array
_NEG_INF = -1e30  # finite, so fully masked rows (left padding) give uniform weights, not NaN


class KVCache(NamedTuple):
    k: Array  # [L, B, S, KV, hd]
    v: Array  # [L, B, S, KV, hd]
    mask: Array  # [B, S] bool: slot holds a real (non-pad) token
    index: Array  # int32 scalar: next slot to write (shared by all rows)


def _dtype(name: str):
    return jnp.dtype(name)


def positions_from_mask(mask: Array) -> Array:
    """Position of each token counting only real tokens: exact under left padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply.
        return scale.astype(x.dtype) * xf.astype(x.dtype)


class Projection(nn.Module):
    """Einsum projection whose kernel keeps head structure ([D, H, hd] etc.) for sharding."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    use_bias: bool
    bias_axes: tuple[str, ...] = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, "kernel", nn.initializers.normal(0.02), self.shape, self.axes, self.param_dtype)
        # float32 accumulation, one rounding to the compute dtype: what accelerators do for bf16,
        # and on XLA CPU a plain bf16 dot takes a ~8x slower path than bf16 x bf16 -> f32.
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(self.dtype)
        if self.use_bias:
            bias_shape = self.shape[len(self.shape) - len(self.bias_axes):]
            bias = _param(self, "bias", nn.initializers.zeros, bias_shape, self.bias_axes, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, attn_mask, layer_cache, index):
        c = self.cfg
        dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
        d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        proj = lambda name, heads, hax: Projection(  # noqa: E731
            (d, heads, hd), ("embed", hax, "head_dim"), "btd,dhk->bthk", c.attention_bias,
            (hax, "head_dim"), dt, pdt, name=name)
        q = apply_rope(proj("q_proj", h, "heads")(x), cos, sin)
        k = apply_rope(proj("k_proj", kv, "kv_heads")(x), cos, sin)
        v = proj("v_proj", kv, "kv_heads")(x)

        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            new_cache = (k, v)
        else:
            new_cache = None

        b, t = q.shape[:2]
        groups = h // kv
        q = q.reshape(b, t, kv, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dt), preferred_element_type=jnp.float32)
        scores = scores * (hd ** -0.5)
        scores = jnp.where(attn_mask[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt),
                         preferred_element_type=jnp.float32).astype(dt).reshape(b, t, h, hd)
        out = Projection((h, hd, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd", False,
                         dtype=dt, param_dtype=pdt, name="o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
        d, f = c.hidden_size, c.intermediate_size
        gate = Projection((d, f), ("embed", "mlp"), "btd,df->btf", False, dtype=dt, param_dtype=pdt, name="gate_proj")(x)
        up = Projection((d, f), ("embed", "mlp"), "btd,df->btf", False, dtype=dt, param_dtype=pdt, name="up_proj")(x)
        return Projection((f, d), ("mlp", "embed"), "btf,fd->btd", False, dtype=dt, param_dtype=pdt,
                          name="down_proj")(nn.silu(gate) * up)


RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, attn_mask, index):
        c = self.cfg
        pdt = _dtype(c.param_dtype)
        x = constrain(x, RESIDUAL_AXES)
        h = RMSNorm(c.rms_norm_eps, pdt, name="input_norm")(x)
        a, new_cache = Attention(c, name="attn")(h, cos, sin, attn_mask, layer_cache, index)
        x = x + a
        h = RMSNorm(c.rms_norm_eps, pdt, name="post_attn_norm")(x)
        x = x + MLP(c, name="mlp")(h)
        return constrain(x, RESIDUAL_AXES), new_cache


def _torch_linear_init(fan_in: int):
    """PyTorch nn.Linear default (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ValueHead(nn.Module):
    """Linear(hidden, 1) with bias on the final normed hidden state (trl's value head)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        pdt = _dtype(c.param_dtype)
        init = nn.initializers.zeros if c.value_head_init == "zeros" else _torch_linear_init(c.hidden_size)
        kernel = _param(self, "kernel", init, (c.hidden_size, 1), ("embed", None), pdt)
        bias = _param(self, "bias", init, (1,), (None,), pdt)
        return (h.astype(jnp.float32) @ kernel.astype(jnp.float32))[..., 0] + bias.astype(jnp.float32)[0]


def remat_policy(remat: str):
    """The `jax.checkpoint` policy of a `ModelConfig.remat` value (None: no rematerialisation,
    `"nothing"`: save only the layer's inputs). "auto" is resolved by the memory planner before a
    run; if it reaches the model unresolved it means "none"."""
    remat = normalize_remat(remat)
    if remat in ("none", "auto"):
        return None
    if remat == "layer":
        return "nothing"
    # "dots_saveable": keep the weight matmuls' outputs (dots without batch dimensions: the
    # q/k/v/o and MLP projections), recompute attention scores / softmax, norms and activations.
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def remat_block(remat: str):
    """`Block`, wrapped in `nn.remat` as `ModelConfig.remat` asks."""
    policy = remat_policy(remat)
    if policy is None:
        return Block
    if policy == "nothing":
        return nn.remat(Block, prevent_cse=False)
    return nn.remat(Block, prevent_cse=False, policy=policy)


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        pdt = _dtype(c.param_dtype)
        self.embed = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=_dtype(c.dtype), param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        block = remat_block(c.remat)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c)
        self.final_norm = RMSNorm(c.rms_norm_eps, pdt)
        if not c.tie_word_embeddings:
            self.lm_head = Projection((c.hidden_size, c.vocab_size), ("embed", "vocab"), "btd,dv->btv",
                                      False, dtype=jnp.float32, param_dtype=pdt)
        self.value_head = ValueHead(c)

    def hidden(self, tokens, positions, attention_mask, cache: KVCache | None = None):
        """Final normed hidden states [B, T, D] (compute dtype) and the updated cache."""
        c = self.cfg
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(positions, c)
        t = tokens.shape[1]
        mask = attention_mask.astype(bool)
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            attn_mask = causal[None] & mask[:, None, :]
            x, _ = self.layers(x, None, cos, sin, attn_mask, None)
            new_cache = None
        else:
            s = cache.k.shape[2]
            slot_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            q_slot = cache.index + jnp.arange(t)
            causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
            attn_mask = causal[None] & slot_mask[:, None, :]
            x, (k, v) = self.layers(x, (cache.k, cache.v), cos, sin, attn_mask, cache.index)
            new_cache = KVCache(k, v, slot_mask, cache.index + t)
        return self.final_norm(x), new_cache

    def heads(self, h):
        """float32 logits [B, T, V] and values [B, T] from final hidden states."""
        hf = h.astype(jnp.float32)
        if self.cfg.tie_word_embeddings:
            logits = hf @ self.embed.embedding.astype(jnp.float32).T
        else:
            logits = self.lm_head(hf)
        return logits, self.values(h)

    def values(self, h):
        return self.value_head(h)

    def hidden_and_values(self, tokens, positions, attention_mask):
        """(final normed hidden [B, T, D] in the compute dtype, values f32 [B, T]): no lm_head."""
        h, _ = self.hidden(tokens, positions, attention_mask)
        return h, self.values(h)

    def __call__(self, tokens, positions, attention_mask, cache: KVCache | None = None):
        h, new_cache = self.hidden(tokens, positions, attention_mask, cache)
        logits, values = self.heads(h)
        return logits, values, new_cache


# ----------------------------------------------------------------------------- pure wrappers


def forward(params, tokens, positions, attention_mask, config: ModelConfig, cache: KVCache | None = None):
    """(logits f32 [B,T,V], values f32 [B,T], cache) — the model as a pure function."""
    return Transformer(config).apply({"params": params}, tokens, positions, attention_mask, cache)


def forward_hidden(params, tokens, positions, attention_mask, config: ModelConfig) -> Array:
    """Final normed hidden states [B, T, D] in float32 (verifier / custom heads)."""
    h, _ = Transformer(config).apply({"params": params}, tokens, positions, attention_mask,
                                     method=Transformer.hidden)
    return h.astype(jnp.float32)


def hidden_states(params, tokens, positions, attention_mask, config: ModelConfig) -> tuple[Array, Array]:
    """`(hidden [B, T, D] in the compute dtype, values f32 [B, T])`: `forward` without the lm_head.

    `values` equal `forward`'s bit for bit; `hidden @ lm_head_matrix(params, config)` in float32 are
    `forward`'s logits. Feed both to `reft_jax.model.logprobs` to get per-token log-probs,
    entropies and NLL without ever holding `[B, T, V]` float32 logits.
    """
    return Transformer(config).apply({"params": params}, tokens, positions, attention_mask,
                                     method=Transformer.hidden_and_values)


def lm_head_matrix(params, config: ModelConfig) -> Array:
    """The output projection `[D, V]` in the params' dtype: the embedding transposed when tied,
    else `lm_head/kernel`. `forward`'s logits are `float32(hidden) @ float32(lm_head_matrix)`."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def apply_heads(params, hidden: Array, config: ModelConfig) -> tuple[Array, Array]:
    """(logits, values) from hidden states: lets callers chunk the vocab projection."""
    return Transformer(config).apply({"params": params}, hidden, method=Transformer.heads)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    dt = _dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((), jnp.int32))


def cache_logical_axes() -> KVCache:
    kv = ("layers", "batch", "length", "kv_heads", "head_dim")
    return KVCache(kv, kv, ("batch", "length"), ())


def _init_boxed(config: ModelConfig, rng: Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens, tokens, jnp.ones((1, 1), bool))["params"]


def init_params(config: ModelConfig, rng: Array):
    """Randomly initialised params as a plain tree of arrays."""
    return nn.meta.unbox(_init_boxed(config, rng))


def logical_axes(config: ModelConfig):
    """The param tree with a tuple of logical axis names at each leaf."""
    boxed = jax.eval_shape(lambda r: _init_boxed(config, r), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shapes(config: ModelConfig):
    """ShapeDtypeStructs of the params, without allocating them."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def param_shardings(config: ModelConfig, mesh):
    from reft_jax.parallel import logical_to_sharding

    return logical_to_sharding(logical_axes(config), param_shapes(config), mesh)


def init_params_sharded(config: ModelConfig, rng: Array, mesh):
    """Initialise directly into the mesh shardings: no device ever holds the whole model."""
    shardings = param_shardings(config, mesh)
    return jax.jit(lambda r: init_params(config, r), out_shardings=shardings)(rng)


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log p(targets) under float32 logits, [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
