"""The sampler (`reft_jax.rollout.sampler`): decode-step parity with the model, log-probs, HF warper
semantics, sampling statistics, stopping, budgets, n samples, sharding; the real SmolLM2 against
transformers' greedy `generate` (slow)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax.rollout import sampler as sampling
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.rollout.sampler import SampleConfig

CFG = ModelConfig(num_layers=2)  # tiny random Llama: vocab 256, GQA 4/2 (2 layers: fast compiles)
QWEN = ModelConfig(num_layers=2, tie_word_embeddings=True, attention_bias=True, architecture="Qwen2ForCausalLM")


def random_params(cfg: ModelConfig, seed: int = 0):
    """Params like the model's init (N(0, 0.02), unit norms) drawn with NumPy: flax's init of
    the scanned model compiles for seconds, this takes milliseconds."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(s.shape, s.dtype)
        return (rng.standard_normal(s.shape) * 0.02).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, llama.param_shapes(cfg))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.fixture(scope="module")
def peaked():
    """A model whose next-token distribution is far from uniform (lm_head scaled up), so the
    filters keep small, distinct sets."""
    p = random_params(CFG, seed=3)
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * 40.0
    return p


def prefixes(lengths, width, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(3, vocab, n)
        mask[i, width - n:] = True
    return tokens, mask


def full_logits(params, cfg, tokens, mask):
    fn = jax.jit(lambda p, t, m: llama.forward(p, t, llama.positions_from_mask(m), m, cfg)[0])
    return fn(params, tokens, mask)


def teacher_forced(params, cfg, rollout, width):
    """Full-forward logits [R, T, V] at the completion positions and log-probs of its tokens."""
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    logits = full_logits(params, cfg, tokens, mask)
    logits = np.asarray(logits)[:, width - 1:-1]
    logp = np.asarray(llama.token_logprobs(logits, tokens[:, width:]))
    return logits, logp


# Most tests share the shape B=4, P=8, T=12 and a few sampling flag sets, so they share programs.
LENGTHS = [3, 8, 6, 5]
GREEDY = SampleConfig(max_new_tokens=12, greedy=True)
PURE = SampleConfig(max_new_tokens=12)  # ReFT rollouts: temperature 1, no top-k / top-p
WARPED = SampleConfig(max_new_tokens=12, temperature=0.7, top_k=40, top_p=0.9, n=2, warped_logprobs=True)


@pytest.mark.parametrize("cfg", [CFG, QWEN], ids=["llama", "qwen2_tied_bias"])
def test_greedy_and_logprobs_match_teacher_forced_forward(cfg, params):
    p = params if cfg is CFG else random_params(cfg, seed=1)
    tokens, mask = prefixes(LENGTHS, 8)
    out = sampling.sample(p, tokens, mask, jax.random.key(0), cfg, GREEDY)
    logits, logp = teacher_forced(p, cfg, out, 8)
    assert np.asarray(out.completion_mask).all() and out.tokens.shape == (4, 20)
    np.testing.assert_array_equal(np.asarray(out.completion), logits.argmax(-1))
    assert np.abs(np.asarray(out.logprobs) - logp).max() <= 1e-4


def test_sampled_logprobs_unwarped_and_warped(params):
    tokens, mask = prefixes(LENGTHS, 8, seed=1)
    out = sampling.sample(params, tokens, mask, jax.random.key(5), CFG, WARPED)
    logits, logp = teacher_forced(params, CFG, out, 8)
    assert np.abs(np.asarray(out.logprobs) - logp).max() <= 1e-4
    warped = np.asarray(jax.nn.log_softmax(sampling.warp_logits(jnp.asarray(logits), WARPED), -1))
    ref = np.take_along_axis(warped, np.asarray(out.completion)[..., None], -1)[..., 0]
    assert np.isfinite(ref).all()  # every sampled token survived the filters
    assert np.abs(np.asarray(out.warped_logprobs) - ref).max() <= 1e-4
    rows = np.asarray(out.completion)
    assert (rows[0::2] != rows[1::2]).any(axis=1).all()  # a prompt's n samples differ


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_decode_tracks_bf16_forward(params, param_dtype):
    cfg = ModelConfig(num_layers=2, dtype="bfloat16", param_dtype=param_dtype)
    p = jax.tree.map(lambda x: x.astype(param_dtype), params)
    tokens, mask = prefixes(LENGTHS, 8, seed=2)
    out = sampling.sample(p, tokens, mask, jax.random.key(0), cfg, PURE)
    _, logp = teacher_forced(p, cfg, out, 8)
    assert out.logprobs.dtype == jnp.float32
    assert np.abs(np.asarray(out.logprobs) - logp).max() <= 0.02


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 7, 1.0), (1.0, 0, 0.8), (1.4, 30, 0.9), (1.0, 1, 1.0),
    (1.0, 0, 0.0), (0.5, 300, 0.5)])
def test_warp_matches_transformers_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32) * 3
    logits[0, :5] = logits[0, 5]  # ties at the top
    scores = torch.from_numpy(logits.copy())
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = scores.numpy()
    config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(sampling.warp_logits(jnp.asarray(logits), config))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)


def _check_frequencies(tokens: np.ndarray, logits, config: SampleConfig):
    want = np.asarray(jax.nn.softmax(sampling.warp_logits(logits, config), -1))
    got = np.bincount(tokens, minlength=want.shape[-1]) / len(tokens)
    assert want.max() > 0.1  # a peaked distribution: a sharp test
    assert got[want == 0].sum() == 0  # nothing outside the kept set
    tv = 0.5 * np.abs(got - want).sum()
    expected = 0.5 * np.sum(np.sqrt(want * (1 - want) / len(tokens))) * np.sqrt(2 / np.pi)  # E[TV] if exact
    assert tv < 2 * expected + 2e-3, (tv, expected)


N_DRAWS = 16384


@pytest.fixture(scope="module")
def peaked_logits(peaked):
    tokens, mask = prefixes([6], 8, seed=4)
    return tokens, mask, full_logits(peaked, CFG, tokens, mask)[0, -1]


def test_sampled_first_tokens_follow_the_warped_distribution(peaked, peaked_logits):
    """End to end: one prompt, 16384 samples of one token, temperature + top-k + top-p."""
    tokens, mask, logits = peaked_logits
    config = SampleConfig(max_new_tokens=1, temperature=1.5, top_k=12, top_p=0.85, n=N_DRAWS)
    out = sampling.sample(peaked, tokens, mask, jax.random.key(11), CFG, config)
    _check_frequencies(np.asarray(out.completion)[:, 0], logits, config)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.7), (1.0, 0, 1.0)])
def test_token_choice_frequencies(peaked_logits, temperature, top_k, top_p):
    """The sampler's token choice on the tiny model's next-token logits, each filter alone."""
    logits = peaked_logits[2]
    config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(2), N_DRAWS)
    choose = jax.jit(lambda lg, k: sampling.choose_tokens(lg, k, jnp.int32(3), config)[0])
    drawn = choose(jnp.broadcast_to(logits, (N_DRAWS, logits.shape[-1])), keys)
    _check_frequencies(np.asarray(drawn), logits, config)


def test_inverse_cdf_never_draws_zero_probability():
    p = jnp.zeros((6, 1000)).at[:, 997].set(1e-30).at[:, 3].set(1.0).at[1, 600].set(5.0)
    u = jnp.asarray([0.0, 0.999999, 0.5, 1 - 2 ** -24, 0.9999999, 0.3])
    idx = np.asarray(sampling.inverse_cdf(p, u))
    assert all(int(i) in (3, 600, 997) for i in idx), idx
    assert idx[1] == 600


def test_same_seed_same_samples_and_per_prompt_keys(params):
    tokens, mask = prefixes(LENGTHS, 8, seed=6)
    a = sampling.sample(params, tokens, mask, jax.random.key(42), CFG, PURE)
    b = sampling.sample(params, tokens, mask, jax.random.key(42), CFG, PURE)
    c = sampling.sample(params, tokens, mask, jax.random.key(43), CFG, PURE)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.completion) != np.asarray(c.completion)).any()
    # with one key per prompt, a prompt's samples do not depend on its row or batch-mates
    keys = jax.random.split(jax.random.key(7), 4)
    perm = np.array([2, 0, 3, 1])
    x = sampling.sample(params, tokens, mask, keys, CFG, PURE)
    y = sampling.sample(params, tokens[perm], mask[perm], keys[perm], CFG, PURE)
    np.testing.assert_array_equal(np.asarray(x.completion)[perm], np.asarray(y.completion))


def test_eos_stops_rows_and_pads_after(params):
    tokens, mask = prefixes(LENGTHS, 8, seed=8)
    eos = tuple(range(3, 27))  # about 1 in 10 tokens of the near-uniform tiny model
    out = sampling.sample(params, tokens, mask, jax.random.key(0), CFG,
                          SampleConfig(max_new_tokens=12, eos_ids=eos, pad_id=1, n=2))
    comp, cm, lengths = map(np.asarray, (out.completion, out.completion_mask, out.lengths))
    for row in range(comp.shape[0]):
        hits = np.flatnonzero(np.isin(comp[row], eos))
        end = hits[0] + 1 if len(hits) else 12
        assert lengths[row] == end
        assert cm[row, :end].all() and not cm[row, end:].any()
        assert (comp[row, end:] == 1).all()
        assert (np.asarray(out.logprobs)[row, end:] == 0).all()
    assert (lengths < 12).any() and (lengths == 12).any()
    np.testing.assert_array_equal(np.asarray(out.mask)[:, 8:], cm)


def test_max_total_len_caps_the_batch_budget(params):
    tokens, mask = prefixes([3, 6, 2, 5], 8, seed=9)  # padded to 8, longest real prompt 6
    capped = SampleConfig(max_new_tokens=12, max_total_len=14, budget_bucket=12)
    assert sampling.completion_budget(mask, capped) == (8, 12)  # 14 - 6; width rounded up
    out = sampling.sample(params, tokens, mask, jax.random.key(0), CFG, capped)
    full = sampling.sample(params, tokens, mask, jax.random.key(0), CFG, PURE)
    np.testing.assert_array_equal(np.asarray(out.lengths), [8] * 4)
    np.testing.assert_array_equal(np.asarray(out.completion)[:, :8], np.asarray(full.completion)[:, :8])
    none = sampling.sample(params, tokens, mask, jax.random.key(0), CFG,
                           dataclasses.replace(capped, max_total_len=6))
    assert not np.asarray(none.completion_mask).any()
    assert sampling.completion_budget(mask, SampleConfig(max_new_tokens=50, max_total_len=19)) == (13, 50)
    assert sampling.completion_budget(mask, SampleConfig(max_new_tokens=1000, max_total_len=700)) == (694, 768)


def test_n_samples_are_contiguous_and_dummy_rows_emit_pad(params):
    tokens, mask = prefixes([5, 7, 0, 4], 8, seed=10)  # row 2 is a dummy (no real token)
    one = sampling.sample(params, tokens, mask, jax.random.key(0), CFG, GREEDY)
    three = sampling.sample(params, tokens, mask, jax.random.key(0), CFG, dataclasses.replace(GREEDY, n=3, pad_id=9))
    comp3 = np.asarray(three.completion).reshape(4, 3, 12)
    live = [0, 1, 3]
    np.testing.assert_array_equal(comp3[live], np.repeat(np.asarray(one.completion)[live, None], 3, 1))
    assert (comp3[2] == 9).all() and (np.asarray(three.lengths)[6:9] == 0).all()
    np.testing.assert_array_equal(np.asarray(three.tokens)[:, :8], np.repeat(tokens, 3, 0))


def test_sharded_over_eight_devices_matches_single_device(params):
    from reft_jax.parallel import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded = jax.device_put(params, llama.param_shardings(CFG, mesh))
    tokens, mask = prefixes([3, 8, 5, 6, 2, 7, 4, 8], 8, seed=12)
    one = sampling.sample(params, tokens, mask, jax.random.key(3), CFG, PURE)
    many = sampling.sample(sharded, tokens, mask, jax.random.key(3), CFG, PURE, mesh=mesh)
    assert len(many.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(many.tokens))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(many.logprobs), atol=1e-4)


def test_config_validation():
    for bad in (dict(max_new_tokens=0), dict(temperature=0.0), dict(top_k=-1), dict(top_p=1.5), dict(n=0)):
        with pytest.raises(ValueError):
            SampleConfig(**bad)
    assert SampleConfig(temperature=0.0, greedy=True).greedy


# ----------------------------------------------------------------------------- real model (slow)

GSM8K_PROMPTS = 4


@pytest.fixture(scope="module")
def smollm2():
    from reft_jax.model.io import load_model, smollm2_gguf_path

    path = smollm2_gguf_path()
    config, params, tokenizer = load_model(path)
    return path, config, params, tokenizer


@pytest.mark.slow
def test_greedy_is_token_identical_to_transformers_generate(smollm2, data_dir):
    """Left-padded batch of GSM8K prompts in ReFT's format, 48 new tokens, float32."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from reft_jax.data.batches import left_pad
    from reft_jax.data.prompts import rollout_prefix

    path, config, params, tokenizer = smollm2
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:40]]
    rows = sorted(rows, key=lambda r: len(r["question"]))[::40 // GSM8K_PROMPTS][:GSM8K_PROMPTS]
    ids = [tokenizer(rollout_prefix(r["question"], "nl"), add_special_tokens=False)["input_ids"] for r in rows]
    assert len({len(i) for i in ids}) == len(ids)  # different lengths: real left padding
    width = max(len(i) for i in ids)
    tokens, mask = left_pad(ids, width, pad_id=2)
    new = 48
    ours = sampling.sample(params, tokens, mask, jax.random.key(0), config,
                           SampleConfig(max_new_tokens=new, greedy=True, eos_ids=(2,), pad_id=2))

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          do_sample=False, max_new_tokens=new, pad_token_id=2, eos_token_id=2)
    ref = ref.numpy()[:, width:]
    got = np.asarray(ours.completion)[:, :ref.shape[1]]
    np.testing.assert_array_equal(got, ref)
