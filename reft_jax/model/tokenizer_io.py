"""Tokenizers for HF directories and GGUF files, without torch.

An HF directory goes through `AutoTokenizer`. A GGUF has no `tokenizer.json`: its vocabulary,
merges and special ids are metadata, which transformers' GGUF tokenizer builders turn into a
fast tokenizer. transformers' own entry point for that (`get_gguf_tokenizer`) reads the file
with a torch-based reader, so the metadata is read here with `gguf.GGUFReader` and only the
torch-free builder (`convert_gguf_tokenizer`) is reused; it is an internal module, hence the
transformers pin in setup.py.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

from reft_jax.model.gguf_io import field, open_gguf
from reft_jax.model.hf_layout import ModelLoadError

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of an HF directory or a `.gguf` file (a `PreTrainedTokenizerFast`).

    Raises `ModelLoadError` when the path has no tokenizer.
    """
    p = pathlib.Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_tokenizer(str(p))
    if p.is_dir():
        if not any((p / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelLoadError(f"{p}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{p}: cannot load the tokenizer ({e})") from e
    raise ModelLoadError(f"{p}: no such model directory or .gguf file")


# GGUF metadata key (after `tokenizer.ggml.`) -> transformers' tokenizer_dict key
_DICT_KEYS = {
    "model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
    "token_type": "token_type", "merges": "merges", "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def gguf_tokenizer(path: str) -> Any:
    """A `PreTrainedTokenizerFast` built from a GGUF's tokenizer metadata (mirrors
    transformers' `get_gguf_tokenizer`, whose special tokens and BOS rule it copies)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    r = open_gguf(path)
    arch = field(r, "general.architecture")
    tok = {name: field(r, f"tokenizer.ggml.{key}") for key, name in _DICT_KEYS.items()}
    tok = {k: v for k, v in tok.items() if v is not None}
    if not tok.get("tokens"):
        raise ModelLoadError(f"{path}: no tokenizer.ggml.tokens metadata, so no tokenizer")
    kwargs: dict[str, Any] = {}
    for key in ("add_bos_token", "add_eos_token"):
        value = field(r, f"tokenizer.ggml.{key}")
        if value is not None:
            kwargs[key] = bool(value)
    if tok.get("tokenizer_type") == "llama":
        kwargs.setdefault("add_bos_token", True)  # llama.cpp's rule for sentencepiece vocabularies
    template = field(r, "tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    for name, key in _SPECIAL.items():
        token_id = field(r, f"tokenizer.ggml.{key}")
        if token_id is not None:
            kwargs[name] = tok["tokens"][int(token_id)]
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok)
    except ValueError as e:
        raise ModelLoadError(f"{path}: cannot build its tokenizer ({e})") from e
    kwargs.update(extra)
    context = field(r, f"{arch}.context_length")
    if context:
        kwargs["model_max_length"] = int(context)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json and generation_config.json."""
    if tokenizer is None:
        return {}
    return {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
