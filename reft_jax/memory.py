"""Per-device memory planning before a run compiles: will this model / mesh / batch fit?

The training loop calls, before it compiles anything::

    plan = memory.plan_run("sft", model_config, mesh, batch=..., seq_len=..., grad_accum=...,
                           remat=..., compute_dtype=..., optim=cfg.optim,
                           device_bytes=memory.device_memory_bytes(cfg.mesh))
    print(memory.format_plan(plan))
    memory.check(plan)          # MemoryPlanError (one line, with the settings that would fit)

and, where the config says "auto" (`optim.grad_accum`, `score_microbatches`, `model.remat`),
`memory.resolve_auto(...)` first picks the values (pure: inputs -> `AutoChoice`).

What is counted, per device, at the peak of each compiled program of a phase:
  sft     one train step: params, AdamW moments, the batch, gradients (f32 accumulator, plus
          the micro-batch's own with grad_accum > 1), a compute-dtype copy of the params,
          activations of one micro-batch, the log-prob working set (a micro-batch's f32 logits
          over the whole vocabulary, or one chunk of positions with `logprob_chunk`), and the
          optimizer update (gradients + the update tree). Also used for online self-training
          and the verifier with their own batch / length (the verifier's 2-way head makes its
          estimate high by the vocabulary logits).
  ppo     three programs that share params, AdamW moments, the reference model and the rollout
          arrays: sampling (KV cache + prefill), the score pass (policy + reference forward over
          `score_microbatches` row blocks) and the update (a train step over one minibatch).
  sample  params, the KV cache and the prefill working set.
The plan's `items` are those of the program with the largest total (`plan.peak_program`);
`plan.programs` holds every program's items.

Activation coefficients are bytes per token per layer, fitted to XLA's buffer assignment on CPU
(`compiled.memory_analysis()`: arguments + outputs - donated aliases + temporaries) for random
Llama shapes (hidden 256-512, 2-8 layers, vocab 8k-16k, 2k tokens per micro-batch, f32), refitted
when the remat settings (none | layer | dots_saveable) and the chunked log-prob head arrived;
tests/test_memory.py holds them to 15% against the compiled SFT step, PPO score pass and PPO
update. A bfloat16 compute dtype is planned at 2 bytes per value (what GPUs and TPUs keep); XLA's
CPU backend upcasts bf16 element-wise work to f32, so a CPU run of a bf16 config holds about the
f32 figure (CPU memory is not checked by default, see `device_memory_bytes`). GPU / TPU fusion
keeps fewer intermediates than XLA CPU, so on accelerators the estimate errs high. Sharding is
exact for params and optimizer state (the rules table in `parallel.py`) and modelled for
activations: tokens split over ('data', 'fsdp'), heads / MLP / vocab over 'tensor' where it divides.

Why this module is long: the per-phase item models, the fitted coefficients, the refusal
message (found by re-planning) and the `auto` resolution share one cost model; split apart, each
piece would need the others' internals.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from reft_jax import parallel
from reft_jax.config import ConfigError
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig, normalize_remat

PHASES = ("sft", "ppo", "sample")
REMATS = ("none", "dots_saveable", "layer")  # the order `auto` tries them in (cheapest recompute first)
GiB = 1024 ** 3
HEADROOM = 0.9  # share of the device a plan may use: XLA's own buffers, fragmentation, fusion slack

# The config keys that check()'s suggestions and resolve_auto()'s errors name.
SETTING_KEYS = {"grad_accum": "optim.grad_accum", "remat": "model.remat",
                "score_microbatches": "score_microbatches", "ref_dtype": "ref_dtype",
                "logprob_chunk": "model.logprob_chunk", "rollout_rows": "batch_questions"}

# Bytes XLA keeps per token, in units of the compute dtype unless noted (fitted on XLA CPU, f32):
_PER_D = 5.75  # per hidden unit and layer: residual stream, norms, projections' inputs / outputs
_PER_F = 6.0  # per MLP unit and layer: gate, up, silu, product and their backward partners
_PER_Q = 2.2  # per query channel (H * hd) and layer
_PER_KV = 0.9  # per key / value channel (2 * KV * hd) and layer
_SCORES_F32 = 4.25  # per head and key position: f32 attention scores (+ probs in the compute dtype)
_REMAT_LAYER = 1.3  # remat: one layer recomputed plus its backward temporaries, x the saved layer
_FORWARD_LAYER = 0.5  # forward only (score pass, prefill): one layer's transients, x the saved layer
# f32 log-prob working sets, bytes per token and vocabulary entry (log-softmax, exp, gradients):
_LOGITS_SFT = 15.5  # SFT loss over whole-vocabulary logits (log_softmax + take + backward)
_LOGITS_PPO = 12.0  # PPO update (logsumexp + take + backward)
_LOGITS_SCORE = 19.5  # score pass: logits + log-prob + entropy, no backward
_CHUNK_TRAIN = 2.0  # chunked head (`model/logprobs.py`), per chunk logits element, with backward (refitted with the head in every training program)
_CHUNK_SCORE = 1.5  # chunked head in the score pass (entropy included)
_ROLLOUT_BYTES = 45  # per rollout token: tokens, masks, scored arrays, the assembled PPO batch
_SFT_BATCH_BYTES = 9  # per token: int32 tokens, bool mask, f32 loss weights


class MemoryPlanError(ConfigError):
    """The plan does not fit the device (one line: what is needed, the biggest item, and which
    settings would make it fit), or `resolve_auto` found no setting that fits."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes at the run's peak. `items`: what coexists in the peak program (name ->
    bytes, biggest first); `programs`: every compiled program's items (sft: "step"; ppo:
    "sample", "score", "update"); `notes` state the assumptions; `inputs` are `plan_run`'s
    arguments (so `check` / `resolve_auto` can re-plan with other settings)."""

    phase: str
    mesh_shape: dict[str, int]
    items: dict[str, int]
    notes: tuple[str, ...] = ()
    programs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    peak_program: str = ""
    device_bytes: int | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def program_total(self, name: str) -> int:
        return sum(self.programs[name].values())

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.items.items(), key=lambda kv: -kv[1])[:n]

    def replan(self, **changes: Any) -> "MemoryPlan":
        """The same run with some `plan_run` arguments changed."""
        return plan_run(**{**self.inputs, **changes})


@dataclasses.dataclass(frozen=True)
class _Shape:
    """Stands in for a Mesh where only axis sizes matter (planning for a pod from a laptop)."""

    shape: dict[str, int]


def _mesh_shape(mesh: Mesh | _Shape | Mapping[str, int]) -> _Shape:
    sizes = dict(mesh.shape) if isinstance(mesh, (Mesh, _Shape)) else dict(mesh)
    return _Shape({a: int(sizes.get(a, 1)) for a in parallel.MESH_AXES})


def _nbytes(dtype: Any) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def param_bytes_per_device(config: ModelConfig, mesh: Mesh | Mapping[str, int], dtype: str | None = None) -> int:
    """Bytes of one copy of the params on one device, under the logical sharding rules."""
    shape = _mesh_shape(mesh)
    return _param_bytes(repr(config), config, tuple(shape.shape.items()), dtype or config.param_dtype)


_PARAM_BYTES_CACHE: dict[tuple, int] = {}


def _param_bytes(key: str, config: ModelConfig, mesh_items: tuple, dtype: str) -> int:
    """Memoised on the config's repr: re-planning (check, resolve_auto) asks again and again."""
    if (key, mesh_items, dtype) in _PARAM_BYTES_CACHE:
        return _PARAM_BYTES_CACHE[(key, mesh_items, dtype)]
    shape = _Shape(dict(mesh_items))
    item = _nbytes(dtype)
    axes, shapes = llama.logical_axes(config), llama.param_shapes(config)
    total = 0
    for ax, sd in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)):
        spec = parallel.logical_to_spec(ax, sd.shape, shape)  # type: ignore[arg-type]
        split = math.prod(shape.shape[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part))
        total += math.prod(sd.shape) * item // split
    _PARAM_BYTES_CACHE[(key, mesh_items, dtype)] = total
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


def _dots_bytes(c: ModelConfig, s: int, tensor: int) -> float:
    """Bytes per token and layer that remat=dots_saveable keeps: the outputs of the weight matmuls
    (q, k, v, o, gate, up, down)."""
    f = _div(c.intermediate_size, tensor)
    h, kv = _div(c.num_heads, tensor), _div(c.num_kv_heads, tensor)
    return s * (h * c.head_dim + 2 * kv * c.head_dim + 2 * c.hidden_size + 2 * f)


def _rows_per_device(rows: int, shape: _Shape) -> int:
    return math.ceil(rows / (shape.shape["data"] * shape.shape["fsdp"]))


def _vocab(c: ModelConfig, shape: _Shape) -> float:
    return _div(c.vocab_size, shape.shape["tensor"])


def _logprob_items(c: ModelConfig, shape: _Shape, rows: int, seq_len: int, chunk: int | None, kind: str,
                   label: str) -> dict[str, int]:
    """The log-prob working set of `rows` sequences per device (`kind`: sft / ppo / score)."""
    v, tok = _vocab(c, shape), rows * seq_len
    if chunk is None:
        coef = {"sft": _LOGITS_SFT, "ppo": _LOGITS_PPO, "score": _LOGITS_SCORE}[kind]
        return {f"log-probs: f32 logits of {label} ({rows} x {seq_len} x {v:.0f})": int(tok * v * coef)}
    chunk = min(chunk, seq_len)
    per = _CHUNK_SCORE if kind == "score" else _CHUNK_TRAIN
    w = c.hidden_size * v * 4 * (1 if kind == "score" else 2)  # f32 lm_head (+ its f32 gradient)
    hidden = tok * c.hidden_size * 4 * 2  # f32 hidden states, chunk-stacked copy
    return {f"log-probs: chunk working set ({rows} x {chunk} x {v:.0f} f32)": int(rows * chunk * v * per * 4),
            "log-probs: f32 lm_head (+ gradient) and hidden states": int(w + hidden)}


def _train_program(c: ModelConfig, shape: _Shape, rows: int, seq_len: int, grad_accum: int, remat: str,
                   compute_dtype: str, params: int, chunk: int | None, kind: str, label: str
                   ) -> tuple[dict[str, int], dict[str, int], str]:
    """(backward-phase items, optimizer-phase items, note) of one train step over `rows`
    sequences (global) in `grad_accum` micro-batches."""
    s, tensor = _nbytes(compute_dtype), shape.shape["tensor"]
    micro = _rows_per_device(math.ceil(rows / grad_accum), shape)
    tokens = micro * seq_len
    grads_f32 = params * 4 // _nbytes(c.param_dtype)
    backward: dict[str, int] = {}
    if grad_accum > 1:
        backward["gradients (f32 accumulator + micro-batch)"] = grads_f32 + params
    else:
        backward["gradients"] = grads_f32
    if _nbytes(compute_dtype) != _nbytes(c.param_dtype):
        backward[f"compute copy of params ({compute_dtype})"] = params * s // _nbytes(c.param_dtype)
    layer = _layer_bytes(c, seq_len, s, tensor)
    logits = _logprob_items(c, shape, micro, seq_len, chunk, kind, f"a {label} micro-batch")
    if remat == "layer" or remat == "dots_saveable":
        backward[f"activations: layer inputs ({remat})"] = int(tokens * c.num_layers * c.hidden_size * s)
        if remat == "dots_saveable":
            backward["activations: saved matmul outputs (dots_saveable)"] = \
                int(tokens * c.num_layers * _dots_bytes(c, s, tensor))
        recompute = int(tokens * _REMAT_LAYER * layer)
        if recompute > sum(logits.values()):  # the loss head runs before the layers' backward
            logits = {"activations: one layer recomputed": recompute}
        backward.update(logits)
    else:
        backward["activations: saved for backward"] = int(tokens * c.num_layers * layer)
        backward.update(logits)
    if shape.shape["fsdp"] > 1:  # a layer's weights all-gathered for its matmuls, forward and backward
        per_layer = (c.num_params(False) - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)) \
            / c.num_layers
        backward["fsdp all-gathered layer weights"] = int(2 * per_layer * s / tensor)
    optimizer = {"gradients": grads_f32, "optimizer update temporaries": params}
    note = (f"{label}: {math.ceil(rows / grad_accum)} sequences x {seq_len} tokens per micro-batch "
            f"({grad_accum} per step), {tokens} tokens per device, remat={remat}, compute {compute_dtype}"
            + (f", log-prob chunk {chunk}" if chunk else ""))
    return backward, optimizer, note


def _sample_program(c: ModelConfig, shape: _Shape, rows: int, max_len: int, prompt_len: int,
                    cache_dtype: str) -> dict[str, int]:
    s, tensor = _nbytes(cache_dtype), shape.shape["tensor"]
    r = _rows_per_device(rows, shape)
    kv = _div(c.num_kv_heads, tensor)
    cache = 2 * c.num_layers * r * max_len * kv * c.head_dim * s
    prefill = r * prompt_len
    working = prefill * (_FORWARD_LAYER * _layer_bytes(c, prompt_len, s, tensor)
                         + 2 * c.num_layers * kv * c.head_dim * s) + r * _vocab(c, shape) * 4 * 4
    return {f"KV cache ({r} rows x {max_len} tokens, {cache_dtype})": int(cache),
            "sampling: prefill working set": int(working)}


def _score_program(c: ModelConfig, shape: _Shape, rows: int, seq_len: int, micro: int, compute_dtype: str,
                   chunk: int | None) -> dict[str, int]:
    s = _nbytes(compute_dtype)
    r = _rows_per_device(math.ceil(rows / micro), shape)
    items = _logprob_items(c, shape, r, seq_len, chunk, "score", "a score micro-batch")
    fwd = r * seq_len * (_FORWARD_LAYER * _layer_bytes(c, seq_len, s, shape.shape["tensor"]))
    if fwd > sum(items.values()):
        items = {"activations: one layer's forward (score pass)": int(fwd)}
    return items


def _resolve_remat(remat: Any, c: ModelConfig) -> str:
    r = normalize_remat(c.remat if remat is None else remat)
    return "none" if r == "auto" else r  # what the model does with an unresolved "auto"


def plan_run(phase: str, model_config: ModelConfig, mesh: Mesh | Mapping[str, int], *, batch: int, seq_len: int,
             grad_accum: int | None = None, remat: str | bool | None = None, compute_dtype: str | None = None,
             optim: Any = None, ref_dtype: str | None = None, rollout_rows: int | None = None,
             prompt_len: int | None = None, score_microbatches: int = 1, logprob_chunk: int | None = None,
             device_bytes: int | None = None, cache_dtype: str | None = None) -> MemoryPlan:
    """Per-device memory plan of one run phase, computed before anything is compiled.

    `batch`: global sequences per optimizer step (sft) / per PPO minibatch (ppo) / sampled at
    once (sample); `seq_len`: tokens per sequence (ppo / sample: prompt block + completion, the
    cache length). `grad_accum`, `compute_dtype` default to `optim`'s (an `OptimConfig`), else
    1 / the model's dtype; `remat` (none | layer | dots_saveable; "auto" plans as none) defaults
    to `model_config.remat`. PPO: the frozen reference model in `ref_dtype` (default the param
    dtype), `rollout_rows` sequences per rollout step (default `batch`) sampled with a prompt
    block of `prompt_len` (default seq_len // 2) and scored in `score_microbatches` row blocks.
    `logprob_chunk`: positions per chunk of the chunked log-prob head (None: whole-vocabulary
    logits). `device_bytes` is kept in the plan for `check` / `format_plan`.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    inputs = dict(phase=phase, model_config=model_config, mesh=dict(_mesh_shape(mesh).shape), batch=batch,
                  seq_len=seq_len, grad_accum=grad_accum, remat=remat, compute_dtype=compute_dtype, optim=optim,
                  ref_dtype=ref_dtype, rollout_rows=rollout_rows, prompt_len=prompt_len,
                  score_microbatches=score_microbatches, logprob_chunk=logprob_chunk,
                  device_bytes=device_bytes, cache_dtype=cache_dtype)
    c, shape = model_config, _mesh_shape(mesh)
    remat = _resolve_remat(remat, c)
    grad_accum = int(grad_accum or getattr(optim, "grad_accum", 1) or 1)
    if compute_dtype is None:  # the narrower of the loss's param cast and the model's own dtype
        compute_dtype = min(getattr(optim, "compute_dtype", None) or c.dtype, c.dtype, key=_nbytes)
    cache_dtype = cache_dtype or compute_dtype
    rows = rollout_rows or batch
    prompt_len = prompt_len or max(1, seq_len // 2)
    params = param_bytes_per_device(c, shape)
    persistent: dict[str, int] = {f"params ({c.param_dtype})": params}
    notes: list[str] = []
    programs: dict[str, dict[str, int]] = {}

    if phase == "sample":
        programs["sample"] = {**persistent, **_sample_program(c, shape, batch, seq_len, prompt_len, cache_dtype)}
        notes.append(f"sampling {batch} sequences of up to {seq_len} tokens (prompt {prompt_len})")
    else:
        persistent["optimizer state (AdamW m, v)"] = 2 * params
        if phase == "sft":
            persistent["batch (tokens, mask, loss weights)"] = \
                _rows_per_device(batch, shape) * seq_len * _SFT_BATCH_BYTES
            backward, optimizer, note = _train_program(c, shape, batch, seq_len, grad_accum, remat, compute_dtype,
                                                       params, logprob_chunk, "sft", "sft")
            notes.append(note)
            step = backward if sum(backward.values()) >= sum(optimizer.values()) else optimizer
            programs["step"] = {**persistent, **step}
        else:
            persistent[f"reference model ({ref_dtype or c.param_dtype})"] = \
                param_bytes_per_device(c, shape, ref_dtype)
            persistent[f"rollout arrays ({rows} rows x {seq_len})"] = \
                _rows_per_device(rows, shape) * seq_len * _ROLLOUT_BYTES
            programs["sample"] = {**persistent,
                                  **_sample_program(c, shape, rows, seq_len, prompt_len, cache_dtype)}
            programs["score"] = {**persistent, **_score_program(c, shape, rows, seq_len, score_microbatches,
                                                                compute_dtype, logprob_chunk)}
            backward, optimizer, note = _train_program(c, shape, batch, seq_len, grad_accum, remat, compute_dtype,
                                                       params, logprob_chunk, "ppo", "update")
            step = backward if sum(backward.values()) >= sum(optimizer.values()) else optimizer
            if batch < rows:
                step = {**step, f"PPO minibatch ({batch} rows)": _rows_per_device(batch, shape) * seq_len * 29}
            programs["update"] = {**persistent, **step}
            notes += [f"rollout: {rows} sequences x {seq_len} tokens (prompt {prompt_len}), scored in "
                      f"{score_microbatches} block(s)", note]
    programs = {k: _sorted(v) for k, v in programs.items()}
    peak = max(programs, key=lambda k: sum(programs[k].values()))
    if len(programs) > 1:
        notes.append(f"peak in the {peak} program (GiB: " + ", ".join(
            f"{k} {sum(v.values()) / GiB:.2f}" for k, v in programs.items()) + ")")
    return MemoryPlan(phase, dict(shape.shape), programs[peak], tuple(notes), programs, peak,
                      None if device_bytes is None else int(device_bytes), inputs)


def estimate(model_config: ModelConfig, mesh: Mesh | Mapping[str, int], phase: str = "sft", batch: int = 8,
             seq_len: int = 1024, optim: Any = None, ref_dtype: str | None = "bfloat16",
             remat: str | bool | None = None, grad_accum: int | None = None, compute_dtype: str | None = None,
             sample_batch: int | None = None, prompt_len: int | None = None, cache_dtype: str | None = None
             ) -> MemoryPlan:
    """The older entry point: `plan_run` with positional phase / batch / length defaults and
    `sample_batch` for `rollout_rows`."""
    return plan_run(phase, model_config, mesh, batch=batch, seq_len=seq_len, grad_accum=grad_accum, remat=remat,
                    compute_dtype=compute_dtype, optim=optim, ref_dtype=ref_dtype, rollout_rows=sample_batch,
                    prompt_len=prompt_len, cache_dtype=cache_dtype)


def _sorted(items: dict[str, int]) -> dict[str, int]:
    return dict(sorted(items.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------
# Device capacity
# ----------------------------------------------------------------------------------------------
def device_memory_bytes(mesh_config: Any = None, device: Any = None) -> int | None:
    """Bytes one device may hold, or None when unknown.

    `mesh_config.device_memory_gib` (`MeshConfig`), when set, wins: it is how CPU runs and tests
    state a budget, and how a user plans for a smaller share of an accelerator. Otherwise the
    allocator's `memory_stats()["bytes_limit"]` (GPU / TPU). The CPU backend reports none, and
    host RAM is not a device limit (the fake devices of one host share it, the OS swaps and
    overcommits): then None, and `check` skips the check, saying so in `format_plan`.
    """
    gib = getattr(mesh_config, "device_memory_gib", None)
    if gib is not None:
        return int(float(gib) * GiB)
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return None


# ----------------------------------------------------------------------------------------------
# Refusal with the settings that would fit
# ----------------------------------------------------------------------------------------------
def _fits(plan: MemoryPlan, device_bytes: int, headroom: float, program: str | None = None) -> bool:
    total = plan.program_total(program) if program else plan.total
    return total <= headroom * device_bytes


def accum_choices(batch: int, batch_divisor: int) -> list[int]:
    """Gradient-accumulation counts that keep every micro-batch a whole multiple of the mesh's
    data * fsdp: divisors g of `batch` with (batch / g) % batch_divisor == 0, ascending."""
    return [g for g in range(1, batch + 1) if batch % g == 0 and (batch // g) % batch_divisor == 0]


def _divisor(plan: MemoryPlan) -> int:
    return plan.mesh_shape["data"] * plan.mesh_shape["fsdp"]


def _current(plan: MemoryPlan) -> dict[str, Any]:
    i = plan.inputs
    return {"grad_accum": int(i["grad_accum"] or getattr(i["optim"], "grad_accum", 1) or 1),
            "remat": _resolve_remat(i["remat"], i["model_config"]),
            "score_microbatches": int(i["score_microbatches"])}


def _smallest_fitting(plan: MemoryPlan, device_bytes: int, headroom: float, key: str, choices: Sequence[Any],
                      program: str | None = None, **fixed: Any) -> Any:
    for v in choices:
        if _fits(plan.replan(**fixed, **{key: v}), device_bytes, headroom, program):
            return v
    return None


def suggestions(plan: MemoryPlan, device_bytes: int, headroom: float = HEADROOM) -> list[str]:
    """Settings (as `key=value`), each of which alone would make `plan` fit, found by re-planning:
    the smallest grad_accum, a remat setting, the smallest score_microbatches (PPO), a bfloat16
    reference model (PPO), a log-prob chunk; a combination of grad_accum and remat when no single
    setting does."""
    i, cur = plan.inputs, _current(plan)
    out: list[str] = []
    if plan.phase == "sample":
        return out
    train = "step" if plan.phase == "sft" else "update"
    over = {p for p in plan.programs if not _fits(plan, device_bytes, headroom, p)}
    accums = [g for g in accum_choices(i["batch"], _divisor(plan)) if g > cur["grad_accum"]]
    remats = [r for r in REMATS[REMATS.index(cur["remat"]) + 1:]] if cur["remat"] in REMATS else []
    if train in over:
        g = _smallest_fitting(plan, device_bytes, headroom, "grad_accum", accums, train)
        if g:
            out.append(f"{SETTING_KEYS['grad_accum']}={g}")
        r = _smallest_fitting(plan, device_bytes, headroom, "remat", remats, train)
        if r:
            out.append(f"{SETTING_KEYS['remat']}={r}")
        if not g and not r:  # both together
            for r in remats:
                g = _smallest_fitting(plan, device_bytes, headroom, "grad_accum", accums, train, remat=r)
                if g:
                    out.append(f"{SETTING_KEYS['grad_accum']}={g} with {SETTING_KEYS['remat']}={r}")
                    break
    if "score" in over:
        rows = i["rollout_rows"] or i["batch"]
        n = _smallest_fitting(plan, device_bytes, headroom, "score_microbatches",
                              [m for m in accum_choices(rows, _divisor(plan)) if m > cur["score_microbatches"]],
                              "score")
        if n:
            out.append(f"{SETTING_KEYS['score_microbatches']}={n}")
    if plan.phase == "ppo" and (i["ref_dtype"] or i["model_config"].param_dtype) == "float32" \
            and _fits(plan.replan(ref_dtype="bfloat16"), device_bytes, headroom):
        out.append(f"{SETTING_KEYS['ref_dtype']}=bfloat16")
    if i["logprob_chunk"] is None and over - {"sample"} and _fits(plan.replan(logprob_chunk=128), device_bytes,
                                                                    headroom):
        out.append(f"{SETTING_KEYS['logprob_chunk']}=128")
    return out


def check(plan: MemoryPlan, device_bytes: int | None = None, headroom: float = HEADROOM) -> bool:
    """Refuse a plan that does not fit `headroom` of `device_bytes` (default: the plan's own, else
    `device_memory_bytes()`), before anything compiles. Raises `MemoryPlanError` with one line:
    what is needed, the largest item, and the settings that would fit (found by re-planning).
    Returns False when the device memory is unknown (CPU without `mesh.device_memory_gib`:
    nothing checked), True when it fits."""
    if device_bytes is None:
        device_bytes = plan.device_bytes if plan.device_bytes is not None else device_memory_bytes()
    if device_bytes is None:
        return False
    if plan.total <= headroom * device_bytes:
        return True
    name, size = plan.largest(1)[0]
    fixes = suggestions(plan, device_bytes, headroom) if plan.inputs else []
    where = f" ({plan.peak_program} program)" if len(plan.programs) > 1 else ""
    tail = ("set " + " or ".join(fixes)) if fixes else \
        ("no batch-splitting or remat setting fits: shard over more devices (mesh.fsdp / mesh.tensor), "
         "or shorten the sequences")
    raise MemoryPlanError(
        f"{plan.phase}{where} needs {plan.total / GiB:.1f} GiB of {device_bytes / GiB:.1f} GiB per device "
        f"(usable {headroom:.0%}; largest: {name} {size / GiB:.1f} GiB; mesh {_mesh_str(plan.mesh_shape)}): {tail}")


# ----------------------------------------------------------------------------------------------
# "auto" settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What `resolve_auto` picked, and the plan with those settings."""

    grad_accum: int
    remat: str
    score_microbatches: int
    plan: MemoryPlan


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == "auto"


def resolve_auto(phase: str, model_config: ModelConfig, mesh: Mesh | Mapping[str, int], *, batch: int,
                 seq_len: int, grad_accum: int | str = 1, remat: str | bool | None = None,
                 score_microbatches: int | str = 1, device_bytes: int | None, headroom: float = HEADROOM,
                 **plan_kwargs: Any) -> AutoChoice:
    """Pick every "auto" setting so the run fits `headroom` of `device_bytes`; pure.

    `grad_accum="auto"`: the smallest count in `accum_choices(batch, data * fsdp)` that fits;
    `remat="auto"` (or `model_config.remat == "auto"` when `remat` is None): none, then
    dots_saveable, then layer, the first that fits (with grad_accum auto too: the first remat
    that fits at some accumulation, with its smallest accumulation: recomputing costs more than
    accumulating); `score_microbatches="auto"` (ppo): the smallest row split of the rollout
    (`rollout_rows`, default `batch`) whose score pass fits. Settings that are not "auto" are
    kept as given. `device_bytes=None` (unknown: CPU) picks the fastest: grad_accum 1, remat
    none, score_microbatches 1. Raises `MemoryPlanError` (a `ConfigError` naming the key) when
    nothing fits even at the largest accumulation with remat=layer. `plan_kwargs` go to
    `plan_run` (compute_dtype, optim, ref_dtype, rollout_rows, prompt_len, logprob_chunk, ...).
    """
    remat = model_config.remat if remat is None else remat
    remat_auto = _is_auto(remat)
    remat_choices = list(REMATS) if remat_auto else [_resolve_remat(remat, model_config)]
    div = math.prod(_mesh_shape(mesh).shape[a] for a in ("data", "fsdp"))
    accums = accum_choices(batch, div) if _is_auto(grad_accum) else [int(grad_accum)]
    if not accums:
        raise MemoryPlanError(f"no grad_accum splits {batch} sequences into micro-batches that are a multiple of "
                              f"data*fsdp = {div}", key="batch", value=batch)
    rows = plan_kwargs.get("rollout_rows") or batch
    scores = (accum_choices(rows, div) or [1]) if _is_auto(score_microbatches) else [int(score_microbatches)]

    def plan(g: int, r: str, n: int) -> MemoryPlan:
        return plan_run(phase, model_config, mesh, batch=batch, seq_len=seq_len, grad_accum=g, remat=r,
                        score_microbatches=n, device_bytes=device_bytes, **plan_kwargs)

    if device_bytes is None:
        return AutoChoice(accums[0], remat_choices[0], scores[0], plan(accums[0], remat_choices[0], scores[0]))
    fits = lambda p, prog=None: _fits(p, device_bytes, headroom, prog)  # noqa: E731
    n = scores[0]
    if phase == "ppo":  # the score pass depends on score_microbatches alone
        n = next((m for m in scores if fits(plan(accums[0], remat_choices[0], m), "score")), None)
        if n is None:
            p = plan(accums[0], remat_choices[0], scores[-1])
            key = SETTING_KEYS["score_microbatches"]
            raise MemoryPlanError(
                f"the PPO score pass needs {p.program_total('score') / GiB:.1f} GiB of {device_bytes / GiB:.1f} GiB "
                f"per device even at {scores[-1]} row block(s): shard over more devices, use a log-prob chunk "
                "or fewer rollout rows", key=key, value=score_microbatches)
    train = {"sft": "step", "ppo": "update"}.get(phase)
    for r in remat_choices:
        for g in accums:
            p = plan(g, r, n)
            if fits(p, train) if train else fits(p):
                if not fits(p):
                    check(p, device_bytes, headroom)  # another program (sampling) does not fit: say so
                return AutoChoice(g, r, n, p)
    p = plan(accums[-1], remat_choices[-1], n)
    target = train or p.peak_program
    key = SETTING_KEYS["grad_accum"] if _is_auto(grad_accum) else SETTING_KEYS["remat"] if remat_auto else None
    raise MemoryPlanError(
        f"{phase} does not fit even at grad_accum={accums[-1]} with remat={remat_choices[-1]}: needs "
        f"{p.program_total(target) / GiB:.1f} GiB of {device_bytes / GiB:.1f} GiB per device (usable "
        f"{headroom:.0%}; largest: {p.largest(1)[0][0]}): shard over more devices (mesh.fsdp / mesh.tensor) or "
        "shorten the sequences", key=key, value="auto" if key else ...)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _mesh_str(shape: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_plan(plan: MemoryPlan, device_bytes: int | None = None, headroom: float = HEADROOM) -> str:
    """A compact table for the run log: item and GiB per device, the total against the device
    memory (or a line saying it is unknown and not checked), the other programs and notes."""
    device_bytes = plan.device_bytes if device_bytes is None else device_bytes
    width = max(len(n) for n in plan.items) + 2
    head = f" ({plan.peak_program} program)" if len(plan.programs) > 1 else ""
    lines = [f"memory plan per device: {plan.phase}{head}, mesh {_mesh_str(plan.mesh_shape)}"]
    for name, b in plan.items.items():
        lines.append(f"  {name:<{width}}{b / GiB:9.3f} GiB")
    lines.append(f"  {'total':<{width}}{plan.total / GiB:9.3f} GiB")
    if device_bytes:
        verdict = "fits" if plan.total <= headroom * device_bytes else "DOES NOT FIT"
        lines.append(f"  {'device memory':<{width}}{device_bytes / GiB:9.3f} GiB  "
                     f"({100 * plan.total / device_bytes:.0f}% used, {headroom:.0%} usable: {verdict})")
    else:
        lines.append(f"  {'device memory':<{width}}  unknown (CPU backend; set mesh.device_memory_gib "
                     "to check): not checked")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def compiled_peak_bytes(compiled: Any) -> int:
    """XLA's own per-device peak for a compiled step: arguments + outputs - donated aliases +
    temporaries (`jax.jit(f).lower(...).compile()`); the ground truth the estimate is tested on."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
