"""Batched autoregressive sampling over a KV cache: the rollout engine of ReFT.

`sample(params, prefix_tokens, prefix_mask, rng, model_config, sample_config) -> Rollout`

Two compiled programs per shape bucket:
  * prefill: the model's own `forward` over the left-padded prefix (positions from the mask),
    logits of the last column only, the cache repeated for the `n` samples of each prompt and
    the first token sampled;
  * decode: a `lax.while_loop`, one token per iteration, with the whole sampling state donated
    (the cache is updated in place, never copied). It stops when every row has emitted an EOS id
    or the budget is spent; finished rows emit pad.

The decode step is the model's own (`model/decode.py`, next to the model it must match).
Only the sampling *flags* are compiled in; temperature, top-k, top-p, EOS and pad ids are traced
(`Knobs`), so one program serves a sweep.

Sampling follows Hugging Face's warpers in their order temperature -> top-k -> top-p
(TopKLogitsWarper keeps ties with the k-th value; TopPLogitsWarper keeps the smallest set of
most probable tokens whose mass reaches top_p, at least one). XLA's CPU sort is very slow
(a [32, 49152] sort or top_k costs ~0.2 s), so the top-k value and the top-p cut are found by
bisection over the float bits instead (exact, ~32 cheap reductions), and only when enabled.
A token is drawn by inverse-CDF from one uniform per row: the same distribution as
`jax.random.categorical` on the processed logits, without its [rows, vocab] Gumbel draw
(which costs more than the rest of the sampling on CPU).

Why this module is long: the warpers (bisection top-k / top-p, inverse-CDF draw), the donated
decode-loop state and the two programs share private invariants (flags compiled in, knobs
traced, the cache layout of `model/decode.py`); split apart, each piece would expose them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reft_jax.data.batches import bucket_length
from reft_jax.model import decode, llama
from reft_jax.model.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How to sample. Only its flags (greedy; temperature, top-k, top-p on or off; warped
    log-probs; n) are compiled in: the values are traced (`Knobs`), so a sweep reuses programs.

    `max_total_len` is Hugging Face's `max_length`: prompt (padded to the batch's longest real
    prompt) plus completion; ReFT rollouts use 700. The completion budget is then
    `min(max_new_tokens, max_total_len - longest prompt in the batch)`.
    """

    max_new_tokens: int = 256
    max_total_len: int | None = None
    temperature: float = 1.0
    top_k: int = 0  # 0: off (ReFT rollouts); HF's generate default, used by ReFT's voting, is 50
    top_p: float = 1.0
    greedy: bool = False
    n: int = 1  # samples per prompt; rows [i*n:(i+1)*n] belong to prompt i
    eos_ids: tuple[int, ...] = ()  # stop a row at any of these (kept, masked in)
    pad_id: int | None = None  # emitted after EOS; None: 0 (the host API uses the tokenizer's)
    warped_logprobs: bool = False  # also return log-probs under the warped distribution
    # With max_total_len the budget depends on the batch; the static completion width is the
    # budget rounded up to this, so batches share programs.
    budget_bucket: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_total_len is not None and self.max_total_len < 1:
            raise ValueError(f"max_total_len must be >= 1, got {self.max_total_len}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.budget_bucket < 1:
            raise ValueError(f"budget_bucket must be >= 1, got {self.budget_bucket}")


class Rollout(NamedTuple):
    """Sampled sequences; R = prompts * n rows, P = prefix width, T = completion width.

    `logprobs` are float32 log-probs of the sampled tokens under the *unwarped* model
    distribution at temperature 1, which is what PPO's ratio and KL need (ReFT samples at
    temperature 1 with no top-k/top-p, where the two coincide). `warped_logprobs` are those of
    the distribution actually sampled from (after temperature/top-k/top-p; 0 for greedy), only
    when `SampleConfig.warped_logprobs`. Both are 0 where `completion_mask` is False.
    """

    tokens: Array  # int32 [R, P+T] prefix + completion
    mask: Array  # bool [R, P+T] real tokens (prefix mask + completion mask)
    completion: Array  # int32 [R, T], pad after EOS / budget
    completion_mask: Array  # bool [R, T], True up to and including the first EOS
    lengths: Array  # int32 [R] completion tokens (EOS included)
    logprobs: Array  # float32 [R, T]
    warped_logprobs: Array | None = None  # float32 [R, T]


# ------------------------------------------------------------------------ token choice (pure)


def _ordered_bits(x: Array) -> Array:
    """float32 -> uint32 with the same order (bisection over exact float values)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _bisect(pred, lo: Array, hi: Array, find_max: bool) -> Array:
    """Largest (find_max) / smallest t in [lo, hi] with pred(t), for a monotone pred; 32 steps
    cover the whole uint32 range. lo/hi: uint32 [R, 1]."""

    def body(_, bounds):
        lo, hi = bounds
        if find_max:  # pred: True...True False...False; invariant pred(lo)
            mid = lo + (hi - lo) // 2 + (hi - lo) % 2
            ok = pred(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + (hi - lo) // 2  # pred: False...False True...True; invariant pred(hi)
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo if find_max else hi


def top_k_mask(x: Array, k: int) -> Array:
    """HF TopKLogitsWarper: keep x >= the k-th largest value (ties kept). bool [R, V]."""
    bits = _ordered_bits(x)
    lo = jnp.zeros(x.shape[:-1] + (1,), jnp.uint32)
    hi = jnp.max(bits, axis=-1, keepdims=True)
    kth = _bisect(lambda t: jnp.sum(bits >= t, axis=-1, keepdims=True) >= k, lo, hi, find_max=True)
    return bits >= kth


def top_p_mask(x: Array, p: Array, top_p: float) -> Array:
    """HF TopPLogitsWarper on logits x with (unnormalised) probabilities p: keep a token iff the
    mass strictly above it is < top_p; the top token is always kept. bool [R, V]."""
    bits = _ordered_bits(x)
    need = top_p * jnp.sum(p, axis=-1, keepdims=True)
    lo = jnp.zeros(x.shape[:-1] + (1,), jnp.uint32)
    hi = jnp.max(bits, axis=-1, keepdims=True)
    # smallest cut t with mass(bits > t) < need; every token at or above it is kept
    cut = _bisect(lambda t: jnp.sum(jnp.where(bits > t, p, 0.0), axis=-1, keepdims=True) < need,
                  lo, hi, find_max=False)
    return bits >= cut


def warp_logits(logits: Array, config: SampleConfig) -> Array:
    """Processed float32 logits (filtered tokens at -inf) in HF's order temperature -> top-k ->
    top-p. The sampler does the same inline (sharing its exponentials); this is the reference."""
    x = logits.astype(jnp.float32)
    if config.temperature != 1.0:
        x = x / config.temperature
    if 0 < config.top_k < x.shape[-1]:
        x = jnp.where(top_k_mask(x, config.top_k), x, -jnp.inf)
    if config.top_p < 1.0:
        p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
        x = jnp.where(top_p_mask(x, p, config.top_p), x, -jnp.inf)
    return x


def argmax_first(x: Array) -> Array:
    """argmax with torch's tie rule (first index) as two plain reductions: XLA CPU's variadic
    argmax reduction is ~10x slower at vocab size."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def inverse_cdf(p: Array, u: Array, block: int = 256) -> Array:
    """Index drawn with probability p / sum(p) per row (p >= 0 unnormalised, u ~ U[0,1) [R]).

    Two levels (block sums, then one block) keep the float32 cumulative sums short and cheap.
    Zero-probability tokens are never returned: targets are clamped below each total.
    """
    r, v = p.shape
    nb = -(-v // block)
    if nb * block != v:
        p = jnp.pad(p, ((0, 0), (0, nb * block - v)))
    pb = p.reshape(r, nb, block)
    cb = jnp.cumsum(jnp.sum(pb, axis=-1), axis=-1)  # [R, nb]
    total = cb[:, -1]
    target = jnp.minimum(u * total, jnp.nextafter(total, 0.0))
    j = jnp.sum(cb <= target[:, None], axis=-1)  # first block whose cumsum exceeds target
    prev = jnp.where(j > 0, jnp.take_along_axis(cb, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.cumsum(jnp.take_along_axis(pb, j[:, None, None], 1)[:, 0], axis=-1)  # [R, block]
    rest = jnp.clip(target - prev, 0.0, jnp.nextafter(inner[:, -1], 0.0))
    i = jnp.sum(inner <= rest[:, None], axis=-1)
    return (j * block + i).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Flags:
    """The static part of a SampleConfig: what is compiled in. Values live in `Knobs`, so
    e.g. a temperature sweep reuses one program."""

    greedy: bool
    temperature: bool
    top_k: bool
    top_p: bool
    warped: bool
    n: int

    @classmethod
    def of(cls, c: SampleConfig) -> "_Flags":
        return cls(c.greedy, c.temperature != 1.0, c.top_k > 0, c.top_p < 1.0, c.warped_logprobs, c.n)


class Knobs(NamedTuple):
    """The traced part of a SampleConfig."""

    temperature: Array  # float32 []
    top_k: Array  # int32 []
    top_p: Array  # float32 []
    eos_ids: Array  # int32 [8k], padded with -1 (never a token)
    pad_id: Array  # int32 []

    @classmethod
    def of(cls, c: SampleConfig) -> "Knobs":
        slots = max(8, -(-len(c.eos_ids) // 8) * 8)  # a few fixed sizes: fewer programs
        eos = np.full((slots,), -1, np.int32)
        eos[:len(c.eos_ids)] = c.eos_ids
        return cls(np.float32(c.temperature), np.int32(c.top_k), np.float32(c.top_p), eos,
                   np.int32(0 if c.pad_id is None else c.pad_id))


def choose_tokens(logits: Array, keys: Array, step: Array, config: SampleConfig
                  ) -> tuple[Array, Array, Array | None]:
    """(token int32 [R], unwarped log-prob [R], warped log-prob [R] or None) for float32 logits
    [R, V]; `keys` are per-row PRNG keys, folded with `step`."""
    return _choose(logits, keys, step, _Flags.of(config), Knobs.of(config))


def _choose(logits: Array, keys: Array, step: Array, flags: _Flags, knobs: Knobs):
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    lse = (m + jnp.log(jnp.sum(e, axis=-1, keepdims=True)))[:, 0]
    warped = None
    if flags.greedy:
        tok = argmax_first(logits)
        if flags.warped:
            warped = jnp.zeros(logits.shape[:1], jnp.float32)
    else:
        x, p = logits, e  # temperature 1 and no filters: reuse the exponentials
        if flags.temperature:
            x = logits / knobs.temperature
            p = jnp.exp(x - m / knobs.temperature)
        if flags.top_k:
            p = jnp.where(top_k_mask(x, knobs.top_k), p, 0.0)
        if flags.top_p:
            p = jnp.where(top_p_mask(x, p, knobs.top_p), p, 0.0)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys)
        tok = inverse_cdf(p, u)
        if flags.warped:
            pt = jnp.take_along_axis(p, tok[:, None], -1)[:, 0]
            warped = jnp.log(pt) - jnp.log(jnp.sum(p, axis=-1))
    logp = jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - lse
    return tok, logp, warped


# ------------------------------------------------------------------------------- programs


class _State(NamedTuple):
    """Everything the decode loop carries; donated to the decode program."""

    step: Array  # int32: completion column of the next token to sample
    budget: Array  # int32: completion tokens allowed in this batch
    tok: Array  # [R] last sampled token (input of the next step)
    pos: Array  # [R] its position
    done: Array  # [R] bool: emitted EOS (or a dummy row)
    keys: Array  # [R] PRNG keys
    ks: tuple[Array, ...]  # per layer [R, KV, S, hd]
    vs: tuple[Array, ...]
    slot_mask: Array  # [R, S]
    prefix: Array  # [R, P]
    prefix_mask: Array  # [R, P]
    completion: Array  # [R, T]
    completion_mask: Array  # [R, T]
    logprobs: Array  # [R, T]
    warped: Array | None  # [R, T]


_TRACES = {"prefill": 0, "decode": 0}


def compile_count() -> int:
    """Programs compiled so far by this module (prefill + decode traces; each trace compiles)."""
    return sum(_TRACES.values())


def _emit(state: _State, tok: Array, logp: Array, warped: Array | None, knobs: Knobs) -> _State:
    """Write the token sampled for column `state.step` (pad for finished rows)."""
    live = ~state.done
    tok = jnp.where(live, tok, knobs.pad_id).astype(jnp.int32)
    col = state.step

    def put(buf, val):
        return jax.lax.dynamic_update_slice(buf, val[:, None].astype(buf.dtype), (0, col))

    is_eos = jnp.any(tok[:, None] == knobs.eos_ids[None, :], axis=1)
    return state._replace(
        step=col + 1, tok=tok, done=state.done | (live & is_eos),
        completion=put(state.completion, tok),
        completion_mask=put(state.completion_mask, live),
        logprobs=put(state.logprobs, jnp.where(live, logp, 0.0)),
        warped=None if warped is None else put(state.warped, jnp.where(live, warped, 0.0)))


def _prefill(params, prefix, prefix_mask, prompt_key, budget, knobs: Knobs, *, cfg: ModelConfig,
             flags: _Flags, new_tokens: int) -> _State:
    _TRACES["prefill"] += 1
    b, p = prefix.shape
    n, t = flags.n, new_tokens
    prefix_mask = prefix_mask.astype(bool)
    positions = llama.positions_from_mask(prefix_mask)
    # The prefill attends over the prefix only; the decode slots are appended below (the last
    # sampled token is never fed back, hence t - 1). Attending over empty slots here cost ~20%.
    cache = llama.init_cache(cfg, b, p)
    h, cache = llama.Transformer(cfg).apply({"params": params}, prefix, positions, prefix_mask, cache,
                                            method=llama.Transformer.hidden)
    logits = llama.apply_heads(params, h[:, -1:], cfg)[0][:, 0]  # [B, V]: last column only

    def rows(x):  # prompt i -> rows [i*n, (i+1)*n)
        return x if n == 1 else jnp.repeat(x, n, axis=0)

    keys = rows(prompt_key)  # [B] -> [R]
    if n > 1:
        keys = jax.vmap(jax.random.fold_in)(keys, jnp.tile(jnp.arange(n), b))
    store = decode.cache_dtype(cfg)
    slots = ((0, 0), (0, 0), (0, t - 1), (0, 0))

    def layer_cache(x):  # [B, P, KV, hd] -> [R, KV, P + t - 1, hd]
        return jnp.pad(rows(x).transpose(0, 2, 1, 3).astype(store), slots)

    ks = tuple(layer_cache(cache.k[i]) for i in range(cfg.num_layers))
    vs = tuple(layer_cache(cache.v[i]) for i in range(cfg.num_layers))
    r = b * n
    rmask = rows(prefix_mask)
    state = _State(
        step=jnp.int32(0), budget=jnp.asarray(budget, jnp.int32), tok=jnp.zeros((r,), jnp.int32),
        pos=rows(positions[:, -1] + 1), done=~jnp.any(rmask, axis=1) | (budget <= 0), keys=keys,
        ks=ks, vs=vs, slot_mask=jnp.pad(rows(cache.mask), ((0, 0), (0, t - 1))), prefix=rows(prefix), prefix_mask=rmask,
        completion=jnp.full((r, t), knobs.pad_id, jnp.int32), completion_mask=jnp.zeros((r, t), bool),
        logprobs=jnp.zeros((r, t), jnp.float32),
        warped=jnp.zeros((r, t), jnp.float32) if flags.warped else None)
    tok, logp, warped = _choose(rows(logits), keys, jnp.int32(0), flags, knobs)
    return _emit(state, tok, logp, warped, knobs)


def _decode(params, state: _State, knobs: Knobs, *, cfg: ModelConfig, flags: _Flags) -> tuple[_State, Rollout]:
    _TRACES["decode"] += 1
    w = decode.decode_weights(params, cfg)
    p = state.prefix.shape[1]

    def cond(s: _State):
        return (s.step < s.budget) & ~jnp.all(s.done)

    def body(s: _State):
        slot = p + s.step - 1  # the cache slot of the token fed in
        slot_mask = jax.lax.dynamic_update_slice(s.slot_mask, jnp.ones((s.tok.shape[0], 1), bool), (0, slot))
        logits, ks, vs = decode.decode_step(w, cfg, s.tok, s.pos, s.ks, s.vs, slot_mask, slot)
        s = s._replace(ks=ks, vs=vs, slot_mask=slot_mask, pos=s.pos + 1)
        tok, logp, warped = _choose(logits, s.keys, s.step, flags, knobs)
        return _emit(s, tok, logp, warped, knobs)

    state = jax.lax.while_loop(cond, body, state)
    rollout = Rollout(
        tokens=jnp.concatenate([state.prefix, state.completion], axis=1),
        mask=jnp.concatenate([state.prefix_mask, state.completion_mask], axis=1),
        completion=state.completion, completion_mask=state.completion_mask,
        lengths=jnp.sum(state.completion_mask, axis=1, dtype=jnp.int32),
        logprobs=state.logprobs, warped_logprobs=state.warped)
    return state, rollout


def _config_key(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _programs(cfg_key: str, flags: _Flags):
    """The jitted (prefill, decode) pair for a model and sampling flags (ModelConfig is not
    hashable, so it travels as its JSON)."""
    cfg = ModelConfig(**json.loads(cfg_key))
    prefill = jax.jit(functools.partial(_prefill, cfg=cfg, flags=flags), static_argnames=("new_tokens",))
    decode = jax.jit(functools.partial(_decode, cfg=cfg, flags=flags), donate_argnums=(1,))
    return prefill, decode


# ------------------------------------------------------------------------------- public entry


def completion_budget(prefix_mask: np.ndarray, config: SampleConfig) -> tuple[int, int]:
    """(budget, static completion width T) for a batch.

    Without `max_total_len` both are `max_new_tokens`. With it, HF's `max_length` rule on the
    batch's longest real prompt: budget = min(max_new_tokens, max_total_len - longest), and T is
    the budget rounded up to one of `bucket_sizes(budget_bucket, max_new_tokens)` so batches
    share programs.
    """
    if config.max_total_len is None:
        return config.max_new_tokens, config.max_new_tokens
    longest = int(np.max(np.sum(np.asarray(prefix_mask, bool), axis=1), initial=0))
    budget = max(0, min(config.max_new_tokens, config.max_total_len - longest))
    width = bucket_length(max(budget, 1), config.budget_bucket, config.max_new_tokens)
    return budget, width


def prompt_keys(rng: Array, batch: int) -> Array:
    """Per-prompt keys: `rng` is one key (prompt i gets fold_in(rng, i)) or already one key per
    prompt [batch]."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(rng)
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))  # legacy uint32 [..., 2] keys
    if rng.ndim == 0:  # fold_in: prompt i's key does not depend on how many prompts there are
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch, dtype=jnp.uint32))
    if rng.shape != (batch,):
        raise ValueError(f"rng must be one key or one key per prompt ({batch}), got shape {rng.shape}")
    return rng


def sample(params: Any, prefix_tokens: Array | np.ndarray, prefix_mask: Array | np.ndarray, rng: Array,
           model_config: ModelConfig, sample_config: SampleConfig, *, mesh=None) -> Rollout:
    """Sample `sample_config.n` completions for each left-padded prefix row.

    prefix_tokens int32 [B, P], prefix_mask bool [B, P] (left padding; a row with no real token
    is a dummy: it emits only pad). `rng`: one key, or one key per prompt [B] (then a prompt's
    samples do not depend on which batch or row it lands in). With `mesh`, rows are sharded over
    ('data', 'fsdp') (B * n must divide evenly); params should already carry their shardings.
    Compiles one prefill and one decode program per (B, P, T, configs).
    """
    b, p = np.shape(prefix_tokens)
    budget, width = completion_budget(np.asarray(prefix_mask), sample_config)
    keys = prompt_keys(rng, b)
    tokens = jnp.asarray(prefix_tokens, jnp.int32)
    mask = jnp.asarray(prefix_mask, bool)
    if mesh is not None:
        from reft_jax.parallel import batch_divisor, batch_sharding, replicated

        if b % batch_divisor(mesh):
            raise ValueError(f"batch {b} is not a multiple of the mesh's data*fsdp = {batch_divisor(mesh)}")
        tokens = jax.device_put(tokens, batch_sharding(mesh, 2))
        mask = jax.device_put(mask, batch_sharding(mesh, 2))
        keys = jax.device_put(keys, batch_sharding(mesh, 1))
        budget = jax.device_put(jnp.int32(budget), replicated(mesh))
    prefill, decode = _programs(_config_key(model_config), _Flags.of(sample_config))
    knobs = Knobs.of(sample_config)
    state = prefill(params, tokens, mask, keys, budget, knobs, new_tokens=width)
    _, rollout = decode(params, state, knobs)
    return rollout
