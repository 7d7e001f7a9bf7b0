"""Bad model input fails with a ModelLoadError naming the file and the problem."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reft_jax import cli
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.model.io import ModelLoadError, load_model, save_hf

TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    import jax

    out = tmp_path_factory.mktemp("good")
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), llama.param_shapes(TINY))
    save_hf(out, TINY, params)
    return out


def copy_dir(src, dst, config_edit=None, tensors_edit=None):
    """A copy of `src` with config.json and/or the tensors changed."""
    dst.mkdir(exist_ok=True)
    hf = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(hf)
    (dst / "config.json").write_text(json.dumps(hf))
    tensors = load_file(str(src / "model.safetensors"))
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def load_error(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_model(path, with_tokenizer=False)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_good_dir_loads(good_dir):
    assert load_model(good_dir, with_tokenizer=False)[0] == TINY


def test_missing_path(tmp_path):
    msg = load_error(tmp_path / "nope")
    assert "nope" in msg and "no such" in msg
    msg = load_error(tmp_path / "nope.gguf")
    assert "nope.gguf" in msg and "no such" in msg


def test_missing_config_and_missing_weights(tmp_path, good_dir):
    assert "config.json" in load_error(tmp_path) and "missing" in load_error(tmp_path)
    (tmp_path / "config.json").write_text((good_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    msg = load_error(tmp_path)
    assert "no *.safetensors" in msg and "pytorch_model.bin" in msg


def test_unsupported_architecture(tmp_path, good_dir):
    path = copy_dir(good_dir, tmp_path / "m", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    msg = load_error(path)
    assert "config.json" in msg and "GPT2LMHeadModel" in msg and "not supported" in msg


def test_tensor_shape_mismatch(tmp_path, good_dir):
    name = "model.layers.0.mlp.up_proj.weight"
    path = copy_dir(good_dir, tmp_path / "m", tensors_edit=lambda t: t.update({name: np.zeros((31, 16), np.float32)}))
    msg = load_error(path)
    assert "model.safetensors" in msg and name in msg and "[31, 16]" in msg and "[32, 16]" in msg


def test_missing_and_unexpected_tensors(tmp_path, good_dir):
    path = copy_dir(good_dir, tmp_path / "a", tensors_edit=lambda t: t.pop("model.norm.weight"))
    assert "missing" in load_error(path) and "model.norm.weight" in load_error(path)
    bias = {"model.layers.0.self_attn.o_proj.bias": np.zeros(16, np.float32)}
    path = copy_dir(good_dir, tmp_path / "b", tensors_edit=lambda t: t.update(bias))
    assert "o_proj.bias" in load_error(path) and "dropped" in load_error(path)


def test_sliding_window_and_dynamic_rope(tmp_path, good_dir):
    mistral = dict(architectures=["MistralForCausalLM"], model_type="mistral")
    path = copy_dir(good_dir, tmp_path / "a", lambda c: c.update(mistral, sliding_window=16))
    msg = load_error(path)
    assert "sliding_window=16" in msg and "config.json" in msg
    path = copy_dir(good_dir, tmp_path / "b", lambda c: c.update(mistral, sliding_window=64))
    assert load_model(path, with_tokenizer=False)[0].architecture == "MistralForCausalLM"
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    path = copy_dir(good_dir, tmp_path / "c", lambda c: c.update(rope_scaling=dynamic))
    assert "dynamic" in load_error(path) and "not supported" in load_error(path)


def _llama_header(w: gguf.GGUFWriter) -> None:
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)


def _write(path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    _llama_header(w)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_of_another_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write(path, "gpt2", {"token_embd.weight": np.zeros((64, 16), np.float32)})
    msg = load_error(path)
    assert "gpt2.gguf" in msg and "'gpt2'" in msg and "not supported" in msg


def test_gguf_with_unsupported_tensor_type(tmp_path):
    path = tmp_path / "int8.gguf"
    _write(path, "llama", {"token_embd.weight": np.zeros((64, 16), np.float32),
                           "blk.0.attn_q.weight": np.zeros((16, 16), np.int8)})
    msg = load_error(path)
    assert "int8.gguf" in msg and "blk.0.attn_q.weight" in msg and "I8" in msg


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file" * 10)
    msg = load_error(path)
    assert "junk.gguf" in msg and "GGUF" in msg


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "reft convert: error:" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
