"""Per-device memory planning before a run starts: will this model / mesh / batch fit?

`estimate(...)` adds up what lives on one device at the step's peak: params, optimizer state,
gradients, the reference model (PPO), the KV cache (sampling) and activations. `check` refuses
a plan that does not fit, naming the biggest items and what to change; `format_plan` is the
table printed at run start.

The peak is the largest of a step's phases, because XLA reuses one phase's buffers in the next:
  persistent   params, AdamW moments (and the reference model, rollout buffers for PPO);
  backward     gradients + activations kept for the backward pass + the f32 logits working set;
  optimizer    gradients + the update tree (optax materialises it before `apply_updates`);
  sampling     the KV cache + prefill working set (phase "sample", and inside a PPO step).

Activation coefficients are bytes per token per layer, measured from XLA's buffer assignment on
CPU (`compiled.memory_analysis()`) over a grid of Llama shapes; GPU/TPU fusion keeps fewer
intermediates, so the estimate errs high there. Sharding is exact for params and optimizer
state (the rules table in `parallel.py`) and modelled for activations: tokens split over
('data', 'fsdp'), heads / MLP / vocab over 'tensor' where it divides.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from reft_jax import parallel
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.train.state import OptimConfig

PHASES = ("sft", "ppo", "sample")
GiB = 1024 ** 3

# Bytes XLA keeps per token, in units of the compute dtype unless noted (fitted on XLA CPU):
_PER_D = 6.6  # per hidden unit and layer: residual stream, norms, projections' inputs / outputs
_PER_F = 6.5  # per MLP unit and layer: gate, up, silu, product and their backward partners
_PER_Q = 2.5  # per query channel (H * hd) and layer
_PER_KV = 1.0  # per key / value channel (2 * KV * hd) and layer
_SCORES_F32 = 4  # attention scores are f32 (preferred_element_type); probs are compute dtype
_LOGITS = 15.5  # bytes per vocab entry: f32 logits, log-softmax and their gradient (~4 copies)
_REMAT_LAYER = 1.3  # remat: one layer recomputed plus its backward temporaries


class MemoryPlanError(ValueError):
    """The plan does not fit the device; the message says what is biggest and what to change."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes at the step's peak. `items` are what coexists at the peak (name ->
    bytes, biggest first); `notes` state the assumptions (tokens per device, dtypes, phases)."""

    phase: str
    mesh_shape: dict[str, int]
    items: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.items.items(), key=lambda kv: -kv[1])[:n]


@dataclasses.dataclass(frozen=True)
class _Shape:
    """Stands in for a Mesh where only axis sizes matter (planning for a pod from a laptop)."""

    shape: dict[str, int]


def _mesh_shape(mesh: Mesh | _Shape | Mapping[str, int]) -> _Shape:
    sizes = dict(mesh.shape) if isinstance(mesh, (Mesh, _Shape)) else dict(mesh)
    return _Shape({a: int(sizes.get(a, 1)) for a in parallel.MESH_AXES})


def _nbytes(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def param_bytes_per_device(config: ModelConfig, mesh: Mesh | Mapping[str, int], dtype: str | None = None) -> int:
    """Bytes of one copy of the params on one device, under the logical sharding rules."""
    shape = _mesh_shape(mesh)
    item = _nbytes(dtype or config.param_dtype)
    axes, shapes = llama.logical_axes(config), llama.param_shapes(config)
    total = 0
    for ax, sd in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)):
        spec = parallel.logical_to_spec(ax, sd.shape, shape)  # type: ignore[arg-type]
        split = math.prod(shape.shape[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part))
        total += math.prod(sd.shape) * item // split
    return total


def _div(n: int, k: int) -> float:
    """n split over k devices if k divides it (the rules replicate otherwise)."""
    return n / k if n % k == 0 else float(n)


def _layer_bytes(c: ModelConfig, t_kv: int, s: int, tensor: int) -> float:
    """Bytes per token that one layer keeps for its backward pass (compute dtype size `s`)."""
    d, f = c.hidden_size, _div(c.intermediate_size, tensor)
    h, kv = _div(c.num_heads, tensor), _div(c.num_kv_heads, tensor)
    return (s * (_PER_D * d + _PER_F * f + _PER_Q * h * c.head_dim + _PER_KV * 2 * kv * c.head_dim)
            + (_SCORES_F32 + s) * h * t_kv)


def _tokens_per_device(batch: int, seq_len: int, shape: _Shape) -> float:
    return math.ceil(batch / (shape.shape["data"] * shape.shape["fsdp"])) * seq_len


def _training_transients(c: ModelConfig, shape: _Shape, batch: int, seq_len: int, grad_accum: int,
                         remat: bool, compute_dtype: str, params: int, label: str) -> tuple[dict, dict, list]:
    """(backward-phase items, optimizer-phase items, notes) for one training step."""
    s, tensor = _nbytes(compute_dtype), shape.shape["tensor"]
    micro = math.ceil(batch / grad_accum)
    tokens = _tokens_per_device(micro, seq_len, shape)
    grads = params * (2 if grad_accum > 1 else 1)  # accumulator + this micro-batch's gradients
    layer = _layer_bytes(c, seq_len, s, tensor)
    logits = tokens * _LOGITS * _div(c.vocab_size, tensor)
    backward: dict[str, int] = {f"gradients{' (accumulator + micro-batch)' if grad_accum > 1 else ''}": grads}
    if compute_dtype != c.param_dtype:
        backward[f"compute copy of params ({compute_dtype})"] = params * s // _nbytes(c.param_dtype)
    if remat:
        backward[f"{label}: layer inputs (remat)"] = int(tokens * c.num_layers * c.hidden_size * s)
        backward[f"{label}: logits / recompute working set"] = int(max(logits, tokens * _REMAT_LAYER * layer))
    else:
        backward[f"{label}: activations saved for backward"] = int(tokens * c.num_layers * layer)
        backward[f"{label}: logits working set (f32)"] = int(logits)
    if shape.shape["fsdp"] > 1:  # a layer's weights all-gathered for its matmuls, forward and backward
        per_layer = (c.num_params(False) - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)) \
            / c.num_layers
        backward["fsdp all-gathered layer weights"] = int(2 * per_layer * s / tensor)
    optimizer = {"gradients": params, "optimizer update temporaries": params}
    notes = [f"{label}: {micro} sequences x {seq_len} tokens per micro-batch ({grad_accum} per step), "
             f"{tokens:.0f} tokens per device, remat={'on' if remat else 'off'}, compute {compute_dtype}"]
    return backward, optimizer, notes


def _sampling_transients(c: ModelConfig, shape: _Shape, batch: int, max_len: int, prompt_len: int,
                         cache_dtype: str) -> dict:
    s, tensor = _nbytes(cache_dtype), shape.shape["tensor"]
    rows = math.ceil(batch / (shape.shape["data"] * shape.shape["fsdp"]))
    kv = _div(c.num_kv_heads, tensor)
    cache = 2 * c.num_layers * rows * max_len * kv * c.head_dim * s
    prefill_tokens = rows * prompt_len
    working = prefill_tokens * (_layer_bytes(c, max_len, s, tensor) + 4 * _div(c.vocab_size, tensor))
    return {f"KV cache ({rows} rows x {max_len} tokens, {cache_dtype})": int(cache),
            "prefill working set (one layer + prompt logits)": int(working)}


def _peak(persistent: dict, phases: dict[str, dict]) -> tuple[dict, str]:
    name = max(phases, key=lambda k: sum(phases[k].values()))
    return {**persistent, **phases[name]}, name


def estimate(model_config: ModelConfig, mesh: Mesh | Mapping[str, int], phase: str = "sft", batch: int = 8,
             seq_len: int = 1024, optim: OptimConfig | None = None, ref_dtype: str = "bfloat16", remat: bool | None = None,
             grad_accum: int | None = None, compute_dtype: str | None = None, sample_batch: int | None = None,
             prompt_len: int | None = None, cache_dtype: str | None = None) -> MemoryPlan:
    """Per-device memory at the peak of one `phase` step.

    `batch`: global sequences per optimizer step (SFT) / per PPO minibatch (PPO) / being sampled
    (sample); `seq_len`: tokens per sequence (for sampling: prompt + completion, the cache length).
    `optim`: an `OptimConfig` (grad_accum, compute_dtype are read from it unless given).
    `remat` defaults to `model_config.remat`. PPO also holds the frozen reference model in
    `ref_dtype` and samples `sample_batch` (default `batch`) rollouts with a KV cache in between
    updates; `prompt_len` (default seq_len // 2) sizes the prefill.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    c, shape = model_config, _mesh_shape(mesh)
    remat = c.remat if remat is None else remat
    grad_accum = grad_accum or getattr(optim, "grad_accum", 1)
    if compute_dtype is None:  # the narrower of the loss's param cast and the model's own dtype
        compute_dtype = min(getattr(optim, "compute_dtype", None) or c.dtype, c.dtype, key=_nbytes)
    cache_dtype = cache_dtype or compute_dtype
    prompt_len = prompt_len or max(1, seq_len // 2)
    params = param_bytes_per_device(c, shape)
    notes: list[str] = []
    persistent: dict[str, int] = {f"params ({c.param_dtype})": params}

    if phase == "sample":
        items = {**persistent, **_sampling_transients(c, shape, batch, seq_len, prompt_len, cache_dtype)}
        notes.append(f"sampling {batch} sequences of up to {seq_len} tokens (prompt {prompt_len})")
        return MemoryPlan(phase, dict(shape.shape), _sorted(items), tuple(notes))

    persistent["optimizer state (AdamW m, v)"] = 2 * params
    if phase == "ppo":
        persistent[f"reference model ({ref_dtype})"] = param_bytes_per_device(c, shape, ref_dtype)
        rows = sample_batch or batch
        persistent["rollout buffers"] = int(8 * 4 * _tokens_per_device(rows, seq_len, shape))
    backward, optimizer, more = _training_transients(c, shape, batch, seq_len, grad_accum, remat, compute_dtype,
                                                     params, "update" if phase == "ppo" else "sft")
    notes += more
    phases = {"backward": backward, "optimizer": optimizer}
    if phase == "ppo":
        phases["sampling"] = _sampling_transients(c, shape, sample_batch or batch, seq_len, prompt_len, cache_dtype)
    items, peak = _peak(persistent, phases)
    others = ", ".join(f"{k} {sum(v.values()) / GiB:.2f}" for k, v in phases.items() if k != peak)
    notes.append(f"peak in the {peak} phase (transients GiB: {peak} {sum(phases[peak].values()) / GiB:.2f}, "
                 f"{others})")
    return MemoryPlan(phase, dict(shape.shape), _sorted(items), tuple(notes))


def _sorted(items: dict[str, int]) -> dict[str, int]:
    return dict(sorted(items.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------
# Device capacity, refusal, report
# ----------------------------------------------------------------------------------------------
def device_memory_bytes(device: Any = None) -> int:
    """Usable bytes of one device: the allocator's limit on GPU / TPU; on CPU the host's
    available RAM shared by the local (possibly fake) devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return _host_available_bytes() // max(1, jax.local_device_count())


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_REMEDIES = (
    ("optimizer state", "shard params and optimizer state further: raise mesh fsdp (or tensor)"),
    ("params", "shard params and optimizer state further: raise mesh fsdp (or tensor)"),
    ("gradients", "shard params and optimizer state further: raise mesh fsdp (or tensor)"),
    ("activations", "turn on remat (model.remat=true), or lower the per-device batch (grad_accum / more data)"),
    ("logits", "lower the per-device micro-batch (raise grad_accum) or sequence length; tensor shards the vocab"),
    ("layer inputs", "lower the per-device micro-batch (raise grad_accum) or sequence length"),
    ("KV cache", "sample fewer rows at once or cap the total length; tensor shards KV heads"),
    ("reference model", "keep the reference model in bfloat16 and shard it with fsdp"),
)


def check(plan: MemoryPlan, device_bytes: int | None = None, headroom: float = 0.9) -> None:
    """Raise MemoryPlanError unless `plan.total <= headroom * device_bytes` (default: this
    process's first device). The headroom leaves room for XLA's own buffers and fragmentation."""
    device_bytes = device_memory_bytes() if device_bytes is None else int(device_bytes)
    budget = headroom * device_bytes
    if plan.total <= budget:
        return
    top = plan.largest(3)
    remedies: list[str] = []
    for name, _ in top:
        for key, remedy in _REMEDIES:
            if key in name and remedy not in remedies:
                remedies.append(remedy)
                break
    biggest = "; ".join(f"{n} {b / GiB:.2f} GiB" for n, b in top)
    raise MemoryPlanError(
        f"{plan.phase} needs about {plan.total / GiB:.2f} GiB per device but {headroom:.0%} of "
        f"{device_bytes / GiB:.2f} GiB is available (mesh {_mesh_str(plan.mesh_shape)}). "
        f"Biggest: {biggest}. Try: " + "; ".join(remedies or ["a larger mesh"]) + ".")


def _mesh_str(shape: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_plan(plan: MemoryPlan, device_bytes: int | None = None) -> str:
    """A table for the run log: one line per item, the total, and the device's capacity."""
    width = max(len(n) for n in plan.items) + 2
    lines = [f"memory plan per device ({plan.phase}, mesh {_mesh_str(plan.mesh_shape)})"]
    for name, b in plan.items.items():
        lines.append(f"  {name:<{width}}{b / GiB:9.3f} GiB  {100 * b / max(plan.total, 1):5.1f}%")
    lines.append(f"  {'total':<{width}}{plan.total / GiB:9.3f} GiB")
    if device_bytes:
        lines.append(f"  {'device capacity':<{width}}{device_bytes / GiB:9.3f} GiB  "
                     f"({100 * plan.total / device_bytes:.0f}% used)")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def compiled_peak_bytes(compiled: Any) -> int:
    """XLA's own per-device peak for a compiled step: arguments + outputs - donated aliases +
    temporaries (`jax.jit(f).lower(...).compile()`); the ground truth the estimate is tested on."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
