"""Import/export mechanics without torch: layout mapping, sharded placement, GGUF reading,
HF export round trips, tokenizers, and the `generate` command on a tiny model."""
from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax import cli
from reft_jax.commands.generate import greedy_fn, left_pad
from reft_jax.model import hf_layout, llama
from reft_jax.model.config import ModelConfig
from reft_jax.model.gguf_io import GGUFSource, _unpermute
from reft_jax.model.io import load_model, load_tokenizer, save_hf, smollm2_gguf_path
from reft_jax.parallel import MeshConfig, make_mesh

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, rope_theta=1e5, max_position_embeddings=64)


def random_params(config: ModelConfig, seed: int = 0):
    """init_params with every leaf (norms included) random, so a misplaced tensor shows."""
    rng = np.random.default_rng(seed)  # numpy: no compile, so fixtures stay fast
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype),
                        llama.param_shapes(config))


def assert_trees_equal(a, b, skip_value_head: bool = True) -> None:
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        if skip_value_head and hf_layout.path_key(path).startswith("value_head"):
            continue
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=hf_layout.path_key(path))


@pytest.fixture(scope="module", params=["llama_untied", "qwen2_tied_bias"])
def tiny(request, tmp_path_factory):
    """(config, params, dir) of a tiny random model saved with save_hf (no tokenizer)."""
    if request.param == "llama_untied":
        config = ModelConfig(**TINY)
    else:
        config = ModelConfig(**TINY, tie_word_embeddings=True, attention_bias=True,
                             architecture="Qwen2ForCausalLM")
    params = random_params(config)
    out = tmp_path_factory.mktemp(request.param)
    save_hf(out, config, params)
    return config, params, out


# ------------------------------------------------------------------------------ layout mapping

@pytest.mark.parametrize("kind,shape", [
    ("embed", (12, 8)), ("linear", (8, 10)), ("heads", (8, 4, 6)), ("o", (4, 6, 8)),
    ("bias", (4, 6)), ("vector", (8,)),
])
def test_read_block_inverts_export_for_every_shard(kind, shape):
    """read_block(ours[idx]) == ours[idx] for shard-like slices of every dim (incl. head cuts)."""
    ours = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    hf = hf_layout.from_ours(kind, ours)
    assert hf.shape == hf_layout.hf_shape(kind, shape)

    class Source:
        path = "mem"

        def read(self, name, rows, cols):
            return hf[rows] if cols is None else hf[rows, cols]

    for split in range(len(shape)):
        n = shape[split]
        for lo, hi in ((0, n), (0, n // 2), (n // 2, n)):
            idx = tuple(slice(lo, hi) if d == split else slice(None) for d in range(len(shape)))
            got = hf_layout.read_block(Source(), "w", kind, shape, idx)
            np.testing.assert_array_equal(got, ours[idx])


def test_load_matches_saved_params_single_device(tiny):
    config, params, path = tiny
    cfg2, loaded, tok = load_model(path)
    assert cfg2 == config and tok is None
    assert_trees_equal(params, loaded)
    assert (path / "model.safetensors").is_file() and (path / "generation_config.json").is_file()


def test_load_places_params_in_mesh_shardings(tiny, monkeypatch):
    """Every leaf lands in the sharding the rules table gives it, with the same values, and
    the safetensors reads are shard-sized (never a whole q_proj)."""
    from reft_jax.model.hf_io import SafetensorsSource

    config, params, path = tiny
    reads = []
    original = SafetensorsSource.read

    def spy(self, name, rows, cols):
        block = original(self, name, rows, cols)
        reads.append((name, block.shape))
        return block

    monkeypatch.setattr(SafetensorsSource, "read", spy)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    _, loaded, _ = load_model(path, mesh, with_tokenizer=False)
    q_reads = {shape for name, shape in reads if name.endswith("q_proj.weight")}
    d, h, hd = config.hidden_size, config.num_heads, config.head_dim
    assert q_reads == {(h // 2 * hd, d // 4)}
    want = llama.param_shardings(config, mesh)
    for (p, x), s in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), hf_layout.path_key(p)
    assert_trees_equal(params, loaded)
    q = loaded["layers"]["attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[1] < config.hidden_size


def test_sharded_export_and_bf16_round_trip(tiny, tmp_path):
    config, params, _ = tiny
    save_hf(tmp_path, config, params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, loaded, _ = load_model(tmp_path, param_dtype="bfloat16")
    assert loaded["embed"]["embedding"].dtype == jnp.bfloat16
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    assert_trees_equal(want, loaded)


def test_value_head_init_options_and_not_exported(tiny, tmp_path):
    config, params, path = tiny
    _, zeros, _ = load_model(path, value_head_init="zeros", with_tokenizer=False)
    assert not np.asarray(zeros["value_head"]["kernel"]).any()
    _, torch_like, _ = load_model(path, seed=3, with_tokenizer=False)
    k = np.asarray(torch_like["value_head"]["kernel"])
    assert k.std() > 0 and np.abs(k).max() <= config.hidden_size ** -0.5  # nn.Linear default
    assert not any("value" in n for n in hf_layout.to_hf_tensors(params, config))


# ------------------------------------------------------------------------------ GGUF

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute (HF rotate_half rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute(_permute(w, 3), 8), w)
    b = np.arange(24.0)
    np.testing.assert_array_equal(_unpermute(_permute(b, 3), 8), b)


def write_llama_gguf(path, config: ModelConfig, tensors: dict[str, np.ndarray],
                     quantize: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A llama GGUF as llama.cpp's converter would write these HF tensors; returns the HF
    tensors as they should read back (quantised ones through quantize/dequantize)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    inverse = {v: k for k, v in {**_gguf_names(config)}.items()}
    expected = {}
    for name, value in tensors.items():
        gname = inverse[name]
        value = np.asarray(value, np.float32)
        if gname.endswith("attn_q.weight"):
            value = _permute(value, config.num_heads)
        elif gname.endswith("attn_k.weight"):
            value = _permute(value, config.num_kv_heads)
        if any(gname.endswith(q) for q in quantize):
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            if gname.endswith("attn_q.weight"):
                back = _unpermute(back, config.head_dim)
            elif gname.endswith("attn_k.weight"):
                back = _unpermute(back, config.head_dim)
            expected[name] = back
        else:
            w.add_tensor(gname, value)
            expected[name] = tensors[name]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _gguf_names(config: ModelConfig) -> dict[str, str]:
    from reft_jax.model.gguf_io import _LAYER_NAMES, _TOP_NAMES

    out = dict(_TOP_NAMES)
    for i in range(config.num_layers):
        out.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in _LAYER_NAMES.items()})
    return out


def test_synthetic_gguf_loads_like_safetensors(tmp_path):
    """A llama.cpp-style GGUF (permuted Q/K, Q8_0 projections) loads to the same params as
    the HF tensors it was made from (up to the Q8_0 rounding, which is reproduced)."""
    config = ModelConfig(**TINY, rms_norm_eps=1e-5)
    params = random_params(config, seed=4)
    tensors = hf_layout.to_hf_tensors(params, config)
    expected = write_llama_gguf(tmp_path / "m.gguf", config, tensors,
                                quantize=("attn_q.weight", "attn_k.weight", "ffn_up.weight"))
    src = GGUFSource(tmp_path / "m.gguf")
    for name, value in expected.items():
        np.testing.assert_allclose(src.read(name, slice(None), None), value, atol=1e-6, err_msg=name)
    cfg, loaded, _ = load_model(tmp_path / "m.gguf", with_tokenizer=False,
                                mesh=make_mesh(MeshConfig(fsdp=2, tensor=4)))
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and cfg.rope_theta == config.rope_theta
    save_hf(tmp_path / "hf", cfg, loaded)
    got = hf_layout.to_hf_tensors(load_model(tmp_path / "hf", with_tokenizer=False)[1], cfg)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(smollm2_gguf_path())


def test_gguf_tokenizer_specials_and_export(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    ids = tok("12 + 7 = 19")["input_ids"]
    assert ids[0] != tok.bos_token_id  # add_bos_token is false in the GGUF
    assert tok.decode(ids) == "12 + 7 = 19"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok("<|im_end|>")["input_ids"] == [2]
    tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    back = load_tokenizer(tmp_path)
    assert back("12 + 7 = 19<|im_end|>")["input_ids"] == tok("12 + 7 = 19<|im_end|>")["input_ids"]
    assert (back.eos_token_id, back.pad_token_id) == (2, 2)


# ------------------------------------------------------------------------------ generate

@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer):
    """A tiny random model over SmolLM2's vocabulary, saved with its tokenizer."""
    config = ModelConfig(**{**TINY, "vocab_size": len(smollm2_tokenizer)}, tie_word_embeddings=True)
    params = random_params(config, seed=7)
    out = tmp_path_factory.mktemp("tiny_chat")
    save_hf(out, config, params, smollm2_tokenizer)
    return config, params, out


def test_greedy_cache_decode_matches_full_forward(tiny_chat_model):
    """Each cached greedy step is the argmax of a cache-free forward over prompt + outputs."""
    config, params, _ = tiny_chat_model
    tokens, mask = left_pad([[5, 6, 7, 8, 9], [11, 12]], pad_id=0)
    n = 6
    out = np.asarray(greedy_fn(config, n)(params, tokens, mask, jnp.int32(-1)))
    seq = np.concatenate([tokens, out], 1)
    full_mask = np.concatenate([mask, np.ones_like(out, bool)], 1)
    logits, _, _ = jax.jit(lambda p, t, m: llama.forward(p, t, llama.positions_from_mask(m), m, config))(
        params, seq, full_mask)
    t = tokens.shape[1]
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, t - 1:t - 1 + n], -1), out)


def test_generate_command_runs(tiny_chat_model, capsys):
    _, _, path = tiny_chat_model
    assert cli.main(["generate", "--model", str(path), "--prompt", "2+2=", "--max-new-tokens", "5",
                     "--chat"]) == 0
    text = capsys.readouterr().out
    assert "params" in text and "tok/s" in text
