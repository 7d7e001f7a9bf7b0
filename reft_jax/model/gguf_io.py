"""GGUF (llama.cpp) files of llama-architecture models: config, tensors and tokenizer metadata.

A GGUF is turned into what an HF checkpoint would hold: an HF `config.json` mapping and
HF-named tensors in HF layout (dequantised to float32 with `gguf.quants.dequantize`, and Q/K
rows un-permuted from llama.cpp's interleaved RoPE layout back to HF's `rotate_half` layout).
From there the HF import path does the rest, so there is one param layout to get right.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import gguf
import numpy as np

from reft_jax.model.hf_layout import ModelLoadError

SUPPORTED_ARCH = "llama"  # llama.cpp writes Llama, Mistral and SmolLM2 all as "llama"

# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A memory-mapped reader, cached so the weights and the tokenizer share one parse (about
    2 s for SmolLM2's 49k-token vocabulary); a file rewritten in place is parsed again."""
    path = str(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such GGUF file")
    stat = os.stat(path)
    return _open_gguf(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, _mtime_ns: int, _size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors / struct errors on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python object (lists for arrays), or `default`."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` implements this tensor type."""
    traits = getattr(gguf.quants, "_type_traits", {})
    return qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or qtype in traits


def gguf_hf_config(path: str) -> dict[str, Any]:
    """The HF `config.json` mapping equivalent to this file's llama.* metadata."""
    r = open_gguf(path)
    arch = field(r, "general.architecture")
    if arch != SUPPORTED_ARCH:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; only {SUPPORTED_ARCH!r} files "
            f"(Llama, Mistral, SmolLM2 as written by llama.cpp) can be imported"
        )
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise ModelLoadError(
            f"{path}: has rope_freqs.weight (Llama-3.1-style RoPE frequency factors); importing "
            f"those from GGUF is not supported: import the HF checkpoint instead"
        )

    def meta(key: str, default: Any = None) -> Any:
        value = field(r, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata {arch}.{key} is missing")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = meta("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ModelLoadError(f"{path}: per-layer KV head counts are not supported")
    head_dim = int(field(r, f"{arch}.attention.key_length", hidden // heads))
    rot = int(field(r, f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ModelLoadError(f"{path}: partial rotary ({rot} of {head_dim} dims) is not supported")
    tokens = field(r, "tokenizer.ggml.tokens") or []
    vocab = int(field(r, f"{arch}.vocab_size", len(tokens) or _hf_shape(_tensor(r, "token_embd.weight"))[0]))
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rope_theta": float(field(r, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(field(r, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "rope_scaling": _rope_scaling(r, arch, path),
    }
    return hf


def _rope_scaling(r: gguf.GGUFReader, arch: str, path: str) -> dict[str, Any] | None:
    kind = field(r, f"{arch}.rope.scaling.type", "none")
    factor = field(r, f"{arch}.rope.scaling.factor")
    if kind == "none" or not factor or float(factor) == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = field(r, f"{arch}.rope.scaling.original_context_length")
        out = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (linear, yarn)")


def _tensor(r: gguf.GGUFReader, name: str):
    for t in r.tensors:
        if t.name == name:
            return t
    raise KeyError(name)


def _hf_shape(t) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-first; HF (row-major) the other way round."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


class GGUFSource:
    """HF-named float32 tensors of a GGUF file; rows are dequantised only when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        r = open_gguf(self.path)
        hf = gguf_hf_config(self.path)
        self._heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}
        self._head_dim = hf["head_dim"]
        self._tensors = {}
        unknown = []
        for t in r.tensors:
            if not dequantizable(t.tensor_type):
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                    f"gguf.quants cannot dequantize (supported: F32, F16, BF16, Q4_0/1, Q5_0/1, "
                    f"Q8_0, K-quants, IQ-quants)"
                )
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
            else:
                self._tensors[name] = t
        if unknown:
            raise ModelLoadError(f"{self.path}: tensor(s) with no HF counterpart, e.g. {unknown[:3]}")

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return _hf_shape(self._tensors[name])

    def where(self, name: str) -> str:
        return f"{self.path} ({self._tensors[name].name})"

    def read(self, name: str, rows: slice, cols: slice | None) -> np.ndarray:
        t = self._tensors[name]
        n_rows = self.shape(name)[0]
        r0, r1, _ = rows.indices(n_rows)
        heads = next((h for p, h in self._heads.items() if f".{p}." in name), None)
        if heads is not None:
            # llama.cpp permuted rows within each head: read whole heads, undo, then cut.
            hd = self._head_dim
            a0, a1 = r0 // hd * hd, -(-r1 // hd) * hd
            block = _unpermute(self._rows(t, a0, a1), hd)[r0 - a0:r1 - a0]
        else:
            block = self._rows(t, r0, r1)
        return block if cols is None else block[:, cols]

    @staticmethod
    def _rows(t, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) in float32: quantised blocks never straddle rows, so slice first."""
        data = t.data[r0:r1]
        return np.asarray(gguf.quants.dequantize(np.asarray(data), t.tensor_type), np.float32)


def _unpermute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows [hd/2, 2] -> [2, hd/2] (rotate_half)."""
    tail = rows.shape[1:]
    return rows.reshape(-1, head_dim // 2, 2, *tail).swapaxes(1, 2).reshape(rows.shape)
