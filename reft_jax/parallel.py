"""Device mesh, the one logical-axis rules table, and shardings derived from it.

Params and activations name their axes logically (`vocab`, `embed`, `heads`, ...); this module
is the only place that knows how those names map onto the physical mesh. Changing the
parallelism strategy means editing `LOGICAL_RULES`, nothing else.

Activations are pinned with `constrain` inside a traced body that `on_mesh_context` has given
the mesh (`train.sharded.jit_step` does this for every train step); elsewhere it is a no-op.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from reft_jax.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. FSDP shards the model dimension of every weight; tensor parallelism
# shards heads / MLP / vocabulary; the batch is split over both data-like axes.
# `activation_*` name the axes of intermediate values (maxtext's naming): the residual stream
# [B, T, D] is split over the batch axes only. Under FSDP the weights' `embed` dim also lives on
# `fsdp`, and without these constraints GSPMD may keep whole-batch activations on each device.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 meaning "all remaining devices".
    `device_memory_gib`: memory of one device for the memory plan (`reft_jax.memory`); None reads
    the accelerator's allocator limit (CPU: unknown, not checked)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    device_memory_gib: float | None = None

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        self.validate()
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh: {num_devices} devices are not divisible by the fixed axes "
                    f"(data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are present"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (classic GSPMD propagation)."""
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = cfg.resolve(len(devices))
    # make_mesh orders devices for the physical topology (ICI rings on TPU); jax 0.10 defaults to
    # Explicit axis types, which break with_sharding_constraint, hence Auto.
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def single_device_mesh() -> Mesh:
    return make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
    return out


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh, rules=LOGICAL_RULES
) -> P:
    """PartitionSpec for one array. Mesh axes that do not divide the dimension are dropped
    (that dimension is replicated over them) so that e.g. 3 KV heads work on tensor=2."""
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules table")
        chosen = []
        size = 1
        for axis in table[name]:
            n = mesh.shape[axis]
            if axis in used or n == 1:
                continue
            if dim % (size * n) == 0:
                chosen.append(axis)
                size *= n
            else:
                log.debug("axis %s (%d) does not divide %s=%d: replicated", axis, n, name, dim)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def logical_to_sharding(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Map a tree of logical-axis tuples (and a matching tree of shapes / arrays /
    ShapeDtypeStructs) to a tree of NamedShardings."""

    def one(axes, shaped):
        shape = shaped.shape if hasattr(shaped, "shape") else tuple(shaped)
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def on_mesh_context(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` whose body runs with `mesh` as JAX's context (abstract) mesh, so that `constrain`
    inside it takes effect. Wrap the function handed to `jax.jit`: the context is entered while
    tracing, which is also where `jax.jit(...).lower(...)` traces. (`jax.set_mesh` cannot be
    entered under jit; `use_abstract_mesh` can, and needs no devices.)"""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint(x, spec of logical_axes)` on the context mesh; `x` unchanged when
    there is none (eager / single-device calls, jits not wrapped by `on_mesh_context`), it has one
    device, or it is not a ('data', 'fsdp', 'tensor') mesh. Values never change, only layout."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Shard dim 0 of a batch over ('data', 'fsdp'), replicate the rest."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this to shard evenly."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays, dim 0 split over the batch axes, from this process's rows of the batch.

    `batch` is a host (numpy) tree holding the rows `distributed.process_batch_slice(B, mesh)`
    of the global batch: with one process that is the whole batch; in a multi-process job each
    process passes only its own rows and the result is the [B, ...] global array. (Processes
    that replicate the batch over a model axis pass the same rows.)
    """
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, batch)


def build_mesh(cfg: MeshConfig) -> Mesh:
    """The run's mesh. Fixed axis sizes asking for fewer devices than present use the first
    ones (e.g. a one-device run on a multi-device host, for debugging or comparisons)."""
    sizes = (cfg.data, cfg.fsdp, cfg.tensor)
    wanted = math.prod(sizes)
    if -1 not in sizes and wanted < jax.device_count():
        return make_mesh(cfg, jax.devices()[:wanted])
    return make_mesh(cfg)


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the batch axes of the mesh."""
    div = batch_divisor(mesh) * grad_accum
    if batch_size % div:
        raise ConfigError(
            f"must be a multiple of data*fsdp*grad_accum = {div} (mesh {dict(mesh.shape)})",
            key="batch_size", value=batch_size)
