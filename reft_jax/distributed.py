"""Multi-process (multi-host) runs: start-up, each process's share of the work, and gathering.

JAX is multi-controller: every host runs the same program, owns its local devices, and feeds
only the rows of the global batch that live on them. This module is the one place that knows
about processes:

* `initialize(cfg)` joins the job (explicit config, our `JAX_*` environment variables, or the
  cluster's own detection on TPU pods / SLURM / Open MPI); with one process it does nothing.
* `process_batch_slice` says which rows of the global batch this process loads;
  `parallel.shard_batch` turns those rows into global arrays.
* `split_for_process` / `gather_from_processes` split host-side work (decoding, running
  programs, rewards) across processes and give every process the whole result, in order.

Everything here also works, trivially, in a single process, so callers never branch on it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from typing import Any, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from reft_jax.parallel import batch_sharding

log = logging.getLogger(__name__)

T = TypeVar("T")

# Our fallback environment variables (JAX itself reads JAX_COORDINATOR_ADDRESS and
# JAX_LOCAL_DEVICE_IDS, but not the other two).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
ENV_AUTO = "REFT_DISTRIBUTED_AUTO"  # 1: let JAX detect the cluster (Cloud TPU VM pod slices); 0: never


@dataclasses.dataclass
class DistributedConfig:
    """How this process joins a multi-process job. All None = environment / auto-detection.

    `auto`: with nothing given explicitly, call `jax.distributed.initialize()` and let JAX
    detect the cluster. None means "only where a cluster is visible in the environment" (SLURM
    with more than one task, Open MPI, a multi-host GKE TPU slice); set True (or the environment
    variable REFT_DISTRIBUTED_AUTO=1) on Cloud TPU VM pod slices, which JAX detects through the
    metadata server (not queried unasked).
    `cpu_collectives` is the cross-process collective backend for CPU devices ("gloo" or "mpi").
    """

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None
    cpu_collectives: str = "gloo"
    auto: bool | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def __post_init__(self) -> None:
        if self.cpu_collectives not in ("gloo", "mpi"):
            raise ValueError(f"cpu_collectives must be 'gloo' or 'mpi', got {self.cpu_collectives!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None \
                and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")


def _env_int(name: str, env: dict[str, str]) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(cfg: DistributedConfig | None = None, env: dict[str, str] | None = None) -> DistributedConfig:
    """`cfg` with unset fields filled from the `JAX_*` / `REFT_DISTRIBUTED_AUTO` environment
    variables (config wins)."""
    cfg = cfg or DistributedConfig()
    env = dict(os.environ) if env is None else env
    ids = cfg.local_device_ids
    if ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        ids = [int(x) for x in env[ENV_LOCAL_DEVICE_IDS].split(",")]
    auto = cfg.auto
    if auto is None and env.get(ENV_AUTO, "") != "":
        auto = env[ENV_AUTO].strip().lower() in ("1", "true", "yes")
    return dataclasses.replace(
        cfg,
        auto=auto,
        coordinator_address=cfg.coordinator_address or env.get(ENV_COORDINATOR) or None,
        num_processes=cfg.num_processes if cfg.num_processes is not None else _env_int(ENV_NUM_PROCESSES, env),
        process_id=cfg.process_id if cfg.process_id is not None else _env_int(ENV_PROCESS_ID, env),
        local_device_ids=ids,
    )


def detect_cluster(env: dict[str, str] | None = None) -> str | None:
    """The managed multi-process environment visible in `env` (cheap: variables only), or None.

    A SLURM allocation with one task, or a single-host TPU VM, is not a multi-process job.
    """
    env = dict(os.environ) if env is None else env
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")) \
            and int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def plan(cfg: DistributedConfig | None = None, env: dict[str, str] | None = None) -> str:
    """What `initialize` will do: "single" (nothing), "explicit" (all three values known) or
    "auto" (let `jax.distributed.initialize` fill the unknowns from the cluster)."""
    env = dict(os.environ) if env is None else env
    r = resolve(cfg, env)
    if r.num_processes == 1:
        return "single"
    if None not in (r.coordinator_address, r.num_processes, r.process_id):
        return "explicit"
    if r.auto or (r.auto is None and (detect_cluster(env) or r.coordinator_address or r.num_processes)):
        return "auto"
    return "single"


def initialize(cfg: DistributedConfig | None = None) -> bool:
    """Join the multi-process job described by `cfg` / the environment. Idempotent.

    Must run before anything touches a JAX backend (`jax.devices()`, any computation). Returns
    True when this process is part of a multi-process job. A single process is a no-op, so every
    entry point can call this unconditionally.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    r = resolve(cfg)
    mode = plan(r)
    if mode == "single":
        return False
    # CPU devices need a cross-process collective backend; harmless for GPU / TPU.
    jax.config.update("jax_cpu_collectives_implementation", r.cpu_collectives)
    # "auto": what is still None, JAX detects (TPU metadata, SLURM, Open MPI variables).
    known = dict(coordinator_address=r.coordinator_address, num_processes=r.num_processes,
                 process_id=r.process_id, local_device_ids=r.local_device_ids)
    kwargs: dict[str, Any] = {k: v for k, v in known.items() if v is not None}
    kwargs["initialization_timeout"] = r.initialization_timeout
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        if "backend" in str(err).lower():
            raise RuntimeError("reft_jax.distributed.initialize() must run before any JAX "
                               "computation or jax.devices() call in this process") from err
        raise
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that writes logs, plots and other single-copy files."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------
# Each process's share of the global batch
# ----------------------------------------------------------------------------------------------
def _batch_rows(global_batch_size: int, mesh: Mesh) -> list[tuple[int, int]]:
    """Sorted distinct [start, stop) row ranges of the batch held by this process's devices."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    spans = {(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
             for s in index_map.values()}
    return sorted(spans)


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
    """Rows `[start, stop)` of the global batch this process must load.

    With `mesh`, read from the batch sharding itself (exact for any device order; processes that
    replicate the batch over a model axis get the same rows). Without, the even split by process
    index, which is what `parallel.make_mesh` gives when the batch axes lead.
    """
    n, i = jax.process_count(), jax.process_index()
    if mesh is None:
        if global_batch_size % n:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {n} processes")
        per = global_batch_size // n
        return slice(i * per, (i + 1) * per)
    spans = _batch_rows(global_batch_size, mesh)
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if stop != start:
            raise ValueError(
                f"process {i} holds non-contiguous batch rows {spans}: the mesh's device order "
                "interleaves processes on the batch axes; build it with parallel.make_mesh")
    return slice(spans[0][0], spans[-1][1])


# ----------------------------------------------------------------------------------------------
# Host-side work: split across processes, gather everywhere
# ----------------------------------------------------------------------------------------------
def split_bounds(n: int, num_parts: int | None = None, part: int | None = None) -> tuple[int, int]:
    """[start, stop) of part `part` of `n` items split into near-equal contiguous parts
    (the first `n % num_parts` parts get one more), so gathering in process order restores order."""
    num_parts = jax.process_count() if num_parts is None else num_parts
    part = jax.process_index() if part is None else part
    base, extra = divmod(n, num_parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


def split_for_process(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous share of `items` (every process passes the same `items`)."""
    start, stop = split_bounds(len(items))
    return items[start:stop]


def _allgather(x: np.ndarray) -> np.ndarray:
    """Stack a same-shaped host array from every process: [num_processes, *x.shape]."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def _gather_ragged(x: np.ndarray) -> list[np.ndarray]:
    """Every process's array, whose leading dimensions may differ (others must agree)."""
    sizes = _allgather(np.asarray([x.shape[0]], np.int64))[:, 0]
    pad = np.zeros((int(sizes.max()) - x.shape[0], *x.shape[1:]), x.dtype)
    stacked = _allgather(np.concatenate([x, pad]))
    return [stacked[p, :s] for p, s in enumerate(sizes)]


def gather_from_processes(local: Any) -> Any:
    """Concatenate every process's `local` results in process order; every process gets it all.

    `local` is a numpy array (leading dimensions may differ between processes, the rest must
    agree) -> numpy array, or a list of picklable Python objects (texts, rewards, dicts) ->
    list. Together with `split_for_process`: `gather_from_processes(f(split_for_process(xs)))
    == f(xs)` for any per-item `f`. All processes must call it (it is a collective).
    """
    is_array = isinstance(local, np.ndarray)
    if jax.process_count() == 1:
        return local.copy() if is_array else list(local)
    if is_array:
        return np.concatenate(_gather_ragged(local))
    payload = np.frombuffer(pickle.dumps(list(local), protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    out: list = []
    for part in _gather_ragged(payload):
        out.extend(pickle.loads(part.tobytes()))
    return out


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
