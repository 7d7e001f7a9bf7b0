"""Logits parity with transformers' PyTorch models (float32), and HF export round trips.

Tiny random Llama / Mistral / Qwen2 checkpoints are written by transformers itself and read by
our importer; the real SmolLM2-135M GGUF is compared with transformers loading the same file
(slow). torch is a test-only dependency.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reft_jax import cli  # noqa: E402
from reft_jax.commands.generate import greedy_fn, left_pad  # noqa: E402
from reft_jax.model.io import load_model, smollm2_gguf_path  # noqa: E402
from reft_jax.model.llama import forward  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {
    # name: (config class, extra config, save_pretrained kwargs)
    "llama_untied_theta1e5": ("LlamaConfig", dict(rope_theta=1e5, tie_word_embeddings=False), {}),
    "llama_tied_llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_scaling=LLAMA3), {}),
    "llama_linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), {}),
    "mistral": ("MistralConfig", dict(sliding_window=None, rms_norm_eps=1e-5), {}),
    "qwen2_bias_tied_sharded": ("Qwen2Config", dict(tie_word_embeddings=True),
                                {"max_shard_size": "40KB"}),
    "qwen2_yarn": ("Qwen2Config", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 64}), {}),
}
MAX_DLOGIT_TINY = 1e-4
MAX_DLOGIT_SMOLLM2 = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The machine's cores are shared: OpenMP spin-waiting under contention made torch up to
    30x slower with 2 threads, so the reference runs on one (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def left_padded_batch(vocab: int, lengths=(12, 9, 4), seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens, mask = left_pad([rng.integers(3, vocab, n).tolist() for n in lengths], pad_id=0)
    return tokens, mask, np.maximum(np.cumsum(mask, -1) - 1, 0)


def torch_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def our_logits(params, config, tokens, mask, positions) -> np.ndarray:
    logits, _, _ = jax.jit(lambda p, t, q, m: forward(p, t, q, m, config))(params, tokens, positions, mask)
    return np.asarray(logits)


def max_dlogit(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask].max())


def make_tiny(name: str, directory) -> object:
    """A random tiny HF model (norms and biases random too) saved by transformers."""
    cls_name, extra, save_kwargs = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**SMALL, **extra)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.1 * torch.randn_like(p))
    model.save_pretrained(directory, **save_kwargs)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def tiny_pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, make_tiny(request.param, directory), directory


def test_tiny_logits_match_transformers(tiny_pair):
    name, hf_model, directory = tiny_pair
    config, params, _ = load_model(directory)
    if name.startswith("qwen2"):
        assert config.attention_bias and (directory / "model.safetensors.index.json").exists() == ("sharded" in name)
    assert config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    tokens, mask, positions = left_padded_batch(config.vocab_size)
    d = max_dlogit(our_logits(params, config, tokens, mask, positions),
                   torch_logits(hf_model, tokens, mask, positions), mask)
    print(f"{name}: max |dlogit| = {d:.2e}")
    assert d <= MAX_DLOGIT_TINY


def test_convert_round_trip_through_transformers(tiny_pair, tmp_path):
    """import -> `reft convert` -> transformers loads the export -> same logits."""
    name, hf_model, directory = tiny_pair
    assert cli.main(["convert", str(directory), str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back) is type(hf_model)
    tokens, mask, positions = left_padded_batch(hf_model.config.vocab_size, seed=1)
    d = max_dlogit(torch_logits(back, tokens, mask, positions),
                   torch_logits(hf_model, tokens, mask, positions), mask)
    print(f"{name}: round trip max |dlogit| = {d:.2e}")
    assert d <= 1e-5


# ------------------------------------------------------------------------------ SmolLM2 (slow)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
]


@pytest.fixture(scope="module")
def smollm2():
    """(hf_model, config, params, tokenizer): both loaded once from the same GGUF, float32."""
    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    config, params, tokenizer = load_model(path)
    print(f"SmolLM2 load: transformers {t1 - t0:.1f} s, ours {time.perf_counter() - t1:.1f} s")
    return hf, config, params, tokenizer


def smollm2_batch(tokenizer):
    tokens, mask = left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)
    return tokens, mask, np.maximum(np.cumsum(mask, -1) - 1, 0)


@pytest.mark.slow
def test_smollm2_gguf_logits_and_greedy_match_transformers(smollm2):
    hf, config, params, tokenizer = smollm2
    assert config.num_params(include_value_head=False) == 134_515_008
    tokens, mask, positions = smollm2_batch(tokenizer)
    d = max_dlogit(our_logits(params, config, tokens, mask, positions),
                   torch_logits(hf, tokens, mask, positions), mask)
    print(f"SmolLM2 GGUF: max |dlogit| = {d:.2e}")
    assert d <= MAX_DLOGIT_SMOLLM2
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    ours = np.asarray(greedy_fn(config, 32)(params, tokens, mask, jnp.int32(-1)))  # -1: no early stop
    np.testing.assert_array_equal(ours, ref[:, tokens.shape[1]:].numpy())


@pytest.mark.slow
def test_smollm2_convert_round_trip(smollm2, tmp_path):
    """GGUF -> `reft convert` -> transformers (weights and tokenizer) gives the same logits."""
    hf, config, params, tokenizer = smollm2
    out = tmp_path / "smollm2"
    assert cli.main(["convert", str(smollm2_gguf_path()), str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    for p in PROMPTS:
        assert back_tok(p)["input_ids"] == tokenizer(p)["input_ids"]
    assert (back_tok.eos_token_id, back_tok.pad_token_id) == (2, 2)
    assert back.generation_config.eos_token_id == 2
    tokens, mask, positions = smollm2_batch(tokenizer)
    d = max_dlogit(torch_logits(back, tokens, mask, positions), torch_logits(hf, tokens, mask, positions), mask)
    print(f"SmolLM2 exported vs transformers-GGUF: max |dlogit| = {d:.2e}")
    assert d <= 1e-5
