"""Where each of our params lives in a transformers checkpoint, and how to move it there and back.

One table (`LEAF_LAYOUTS`) names the HF tensor behind every leaf of our param tree and the
reshape between the two layouts (HF `Linear.weight` is `[out, in]`; our kernels are `[in, ...]`
with head structure kept for sharding). Import reads each leaf *slice by slice* from a
`TensorSource` straight into its sharding (`place_params`), so a device only ever receives its
own shard and a safetensors reader only touches the bytes of that shard; export
(`to_hf_tensors`) is the inverse reshape on host arrays. Sources (safetensors, GGUF) only have to
provide HF-named tensors in HF layout.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from reft_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message names the file and the problem."""


class TensorSource(Protocol):
    """HF-named tensors in HF layout, read lazily.

    `read(name, rows, cols)` returns `tensor[rows, cols]` (or `tensor[rows]` for 1-D tensors,
    where `cols` is None) as a host array; implementations read only what was asked for when
    their format allows it.
    """

    path: str

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def where(self, name: str) -> str: ...

    def read(self, name: str, rows: slice, cols: slice | None) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one leaf maps to an HF tensor. `kind` is one of:
    embed  ours [V, D]       = W
    linear ours [in, out]    = W.T              (mlp, lm_head)
    heads  ours [D, H, hd]   = W.T.reshape      (q/k/v)
    o      ours [H, hd, D]   = W.T.reshape      (o_proj)
    bias   ours [H, hd]      = b.reshape        (q/k/v biases)
    vector ours [D]          = w                (norm scales)
    """

    hf_name: str  # with `{i}` for the layer index when the leaf is layer-stacked
    kind: str


_LAYER = "model.layers.{i}."
LEAF_LAYOUTS: dict[str, LeafLayout] = {
    "embed/embedding": LeafLayout("model.embed_tokens.weight", "embed"),
    **{
        f"layers/attn/{p}_proj/kernel": LeafLayout(_LAYER + f"self_attn.{p}_proj.weight", "heads")
        for p in "qkv"
    },
    **{f"layers/attn/{p}_proj/bias": LeafLayout(_LAYER + f"self_attn.{p}_proj.bias", "bias") for p in "qkv"},
    "layers/attn/o_proj/kernel": LeafLayout(_LAYER + "self_attn.o_proj.weight", "o"),
    **{
        f"layers/mlp/{p}_proj/kernel": LeafLayout(_LAYER + f"mlp.{p}_proj.weight", "linear")
        for p in ("gate", "up", "down")
    },
    "layers/input_norm/scale": LeafLayout(_LAYER + "input_layernorm.weight", "vector"),
    "layers/post_attn_norm/scale": LeafLayout(_LAYER + "post_attention_layernorm.weight", "vector"),
    "final_norm/scale": LeafLayout("model.norm.weight", "vector"),
    "lm_head/kernel": LeafLayout("lm_head.weight", "linear"),
}
# Tensors some checkpoints carry that hold nothing we need (RoPE buffers of old exports).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
VALUE_HEAD = "value_head"


def path_key(path: tuple) -> str:
    """'layers/attn/q_proj/kernel' for a jax tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _range(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"strided shard index {s} is not supported")
    return start, stop


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF tensor shape for one (unstacked) leaf shape of the given kind."""
    if kind in ("embed", "vector"):
        return shape
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "heads":
        return (shape[1] * shape[2], shape[0])
    if kind == "o":
        return (shape[2], shape[0] * shape[1])
    if kind == "bias":
        return (shape[0] * shape[1],)
    raise ValueError(kind)


def read_block(source: TensorSource, name: str, kind: str, shape: tuple[int, ...], idx: tuple) -> np.ndarray:
    """`ours[idx]` for one unstacked leaf, reading only the HF rows/cols that slice needs.

    Head-structured kinds read whole heads (a contiguous row or column range) and cut
    `head_dim` afterwards, which keeps every read a rectangle.
    """
    if kind == "embed":
        return source.read(name, idx[0], idx[1])
    if kind == "vector":
        return source.read(name, idx[0], None)
    if kind == "linear":
        return source.read(name, idx[1], idx[0]).T
    hd = shape[-2] if kind == "o" else shape[-1]
    if kind == "heads":
        h0, h1 = _range(idx[1], shape[1])
        block = source.read(name, slice(h0 * hd, h1 * hd), idx[0])  # [H'*hd, D']
        return block.reshape(h1 - h0, hd, -1)[:, idx[2], :].transpose(2, 0, 1)
    if kind == "o":
        h0, h1 = _range(idx[0], shape[0])
        block = source.read(name, idx[2], slice(h0 * hd, h1 * hd))  # [D', H'*hd]
        return block.reshape(block.shape[0], h1 - h0, hd)[:, :, idx[1]].transpose(1, 2, 0)
    if kind == "bias":
        h0, h1 = _range(idx[0], shape[0])
        return source.read(name, slice(h0 * hd, h1 * hd), None).reshape(h1 - h0, hd)[:, idx[1]]
    raise ValueError(kind)


def from_ours(kind: str, value: np.ndarray) -> np.ndarray:
    """The HF tensor for one unstacked leaf value (the inverse of `read_block`)."""
    if kind in ("embed", "vector"):
        return value
    if kind == "linear":
        return value.T
    if kind == "heads":
        return value.reshape(value.shape[0], -1).T
    if kind == "o":
        return value.reshape(-1, value.shape[-1]).T
    if kind == "bias":
        return value.reshape(-1)
    raise ValueError(kind)


def _layouts(abstract: Any) -> dict[str, tuple[LeafLayout, bool]]:
    """key -> (layout, stacked) for every non-value-head leaf; fails loudly on layout drift."""
    out = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(abstract):
        key = path_key(path)
        if key.startswith(VALUE_HEAD + "/"):
            continue
        if key not in LEAF_LAYOUTS:
            raise KeyError(f"param {key!r} has no HF layout in hf_layout.LEAF_LAYOUTS")
        out[key] = (LEAF_LAYOUTS[key], key.startswith("layers/"))
    return out


def check_source(source: TensorSource, config: ModelConfig, abstract: Any) -> None:
    """Every tensor we need exists with the right shape, and nothing we would drop is present."""
    needed: dict[str, tuple[int, ...]] = {}
    for key, (layout, stacked) in _layouts(abstract).items():
        shape = _leaf(abstract, key).shape
        if stacked:
            for i in range(shape[0]):
                needed[layout.hf_name.format(i=i)] = hf_shape(layout.kind, shape[1:])
        else:
            needed[layout.hf_name] = hf_shape(layout.kind, shape)
    have = source.names()
    missing = sorted(set(needed) - have)
    if missing:
        raise ModelLoadError(
            f"{source.path}: {len(missing)} tensor(s) missing for a {config.architecture} with "
            f"{config.num_layers} layers, e.g. {missing[:3]}"
        )
    for name, want in needed.items():
        got = tuple(source.shape(name))
        if got != want:
            raise ModelLoadError(
                f"{source.where(name)}: tensor {name!r} has shape {list(got)} but the config "
                f"implies {list(want)}"
            )
    extra = sorted(n for n in have - set(needed) if not n.endswith(IGNORED_SUFFIXES))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        # Some exports store the tied head too; it must equal the embedding, so skip it.
        extra.remove("lm_head.weight")
    if extra:
        raise ModelLoadError(
            f"{source.path}: {len(extra)} tensor(s) this model has no place for (they would be "
            f"silently dropped), e.g. {extra[:3]}"
        )


def _leaf(tree: Any, key: str) -> Any:
    for part in key.split("/"):
        tree = tree[part]
    return tree


def leaf_reader(source: TensorSource, layout: LeafLayout, stacked: bool, shape: tuple[int, ...],
                dtype: Any) -> Callable[[tuple], np.ndarray]:
    """The `make_array_from_callback` callback for one leaf: index -> host block in `dtype`."""

    def read(idx: tuple) -> np.ndarray:
        idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
        if not stacked:
            block = read_block(source, layout.hf_name, layout.kind, shape, idx)
        else:
            l0, l1 = _range(idx[0], shape[0])
            block = np.stack([
                read_block(source, layout.hf_name.format(i=i), layout.kind, shape[1:], idx[1:])
                for i in range(l0, l1)
            ])
        return np.asarray(block).astype(dtype)

    return read


def place_params(source: TensorSource, config: ModelConfig, abstract: Any, shardings: Any,
                 value_head: Mapping[str, jax.Array]) -> Any:
    """The param tree with every leaf built shard by shard from `source` into its sharding.

    `abstract` gives shapes/dtypes (from `jax.eval_shape` of init); `value_head` holds the
    already-placed value-head leaves, which no HF checkpoint has.
    """
    check_source(source, config, abstract)
    layouts = _layouts(abstract)

    def build(path, leaf, sharding):
        key = path_key(path)
        if key.startswith(VALUE_HEAD + "/"):
            return value_head[key.split("/", 1)[1]]
        layout, stacked = layouts[key]
        dtype = jnp.dtype(leaf.dtype)
        return jax.make_array_from_callback(
            leaf.shape, sharding, leaf_reader(source, layout, stacked, leaf.shape, dtype))

    return jax.tree_util.tree_map_with_path(build, abstract, shardings)


def to_hf_tensors(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named host arrays for every param except the value head (HF models have none)."""
    out: dict[str, np.ndarray] = {}
    for key, (layout, stacked) in _layouts(params).items():
        value = _host(_leaf(params, key))
        if stacked:
            for i in range(value.shape[0]):
                out[layout.hf_name.format(i=i)] = np.ascontiguousarray(from_ours(layout.kind, value[i]))
        else:
            out[layout.hf_name] = np.ascontiguousarray(from_ours(layout.kind, value))
    return out


def _host(x: Any) -> np.ndarray:
    """A whole array on this host (gathering across processes when it is not all addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
