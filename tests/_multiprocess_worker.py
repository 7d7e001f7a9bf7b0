"""A tiny SFT + PPO run used by tests/test_distributed.py, in one process or as one of several.

Run as a script, it is one process of a multi-process job:

    python tests/_multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id I --out DIR

(with XLA_FLAGS=--xla_force_host_platform_device_count=4 in its environment; the three job
flags may come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID instead). Imported, the test
calls `train` in its own 8-device process to get the reference numbers. Both paths run exactly
the same steps on the same (data=2, fsdp=2, tensor=2) mesh; each process feeds only its rows.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

_T0 = time.monotonic()

if __name__ == "__main__":  # runnable from anywhere: put the repository on the path
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from reft_jax import distributed, parallel  # noqa: E402
from reft_jax.checkpoint import Checkpointer  # noqa: E402
from reft_jax.model import llama  # noqa: E402
from reft_jax.model.config import ModelConfig  # noqa: E402
from reft_jax.train import ppo_step, sharded  # noqa: E402
from reft_jax.train.sft_step import make_sft_step  # noqa: E402
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
MESH = parallel.MeshConfig(data=2, fsdp=2, tensor=2)
OPTIM = OptimConfig(lr=1e-3, schedule="constant")
BATCH, LEN, PROMPT = 8, 16, 5
SFT_STEPS = PPO_STEPS = 3
PPO = ppo_step.PPOAlgoConfig(kl_coef=0.05)
EOS_IDS = (2,)


# --- deterministic global batches (every process builds the same, then keeps its rows) -----
def sft_batch(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([1, step])
    tokens = rng.integers(3, CFG.vocab_size, (BATCH, LEN)).astype(np.int32)
    lengths = rng.integers(LEN // 2, LEN + 1, BATCH)
    mask = np.arange(LEN)[None] < lengths[:, None]
    weights = (mask & (np.arange(LEN)[None] >= PROMPT - 1)).astype(np.float32)
    weights[np.arange(BATCH), lengths - 1] = 0.0  # the last real token predicts nothing
    return {"tokens": tokens, "attention_mask": mask, "loss_weights": weights}


def rollout_batch(step: int) -> dict[str, np.ndarray]:
    """A fake rollout: prompt block of PROMPT tokens, a completion ending in EOS (id 2) at a
    random place, the attention mask up to and including EOS, and a score per row."""
    rng = np.random.default_rng([2, step])
    tokens = rng.integers(3, CFG.vocab_size, (BATCH, LEN)).astype(np.int32)
    eos_at = rng.integers(PROMPT + 2, LEN, BATCH)
    tokens[np.arange(BATCH), eos_at] = 2
    return {"tokens": tokens, "attention_mask": np.arange(LEN)[None] <= eos_at[:, None],
            "prompt_len": np.full(BATCH, PROMPT, np.int32),
            "scores": rng.choice(np.float32([0.0, 0.1, 1.0]), BATCH)}


def local_rows(batch: dict[str, np.ndarray], mesh) -> dict[str, np.ndarray]:
    rows = distributed.process_batch_slice(BATCH, mesh)
    return {k: v[rows] for k, v in batch.items()}


def prepare(params, ref_params, rollout: dict) -> dict:
    """Score pass (policy and reference log-probs, values) and GAE with global whitening."""
    scored = ppo_step.score_pass(params, ref_params, rollout, CFG, PPO, eos_ids=EOS_IDS)
    return ppo_step.assemble(scored, rollout, rollout["scores"], PPO, eos_ids=EOS_IDS)[0]


def host_params_init(config: ModelConfig, seed: int = 0) -> dict:
    """Deterministic numpy params (N(0, 0.02), norm scales 1): no XLA compile, same everywhere."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0, 0.02, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, llama.param_shapes(config))


def place_params(host: dict, mesh):
    """Host params onto the mesh, each process filling only its own shards."""
    return jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda i: x[i]),
                        host, llama.param_shardings(CFG, mesh))


def init_state(mesh, tx) -> TrainState:
    """The same initial TrainState on any mesh and any number of processes."""
    params = place_params(host_params_init(CFG), mesh)
    return sharded.create_state(params, tx, jax.random.key(1), mesh)


# Cheaper XLA CPU compiles: these runs are compile-bound, and every compared run uses the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


_COMPILED: dict = {}


def compiled(key: tuple, make_jitted, *args):
    """`make_jitted()` compiled for `args` with FAST_COMPILE (keeps its shardings and donation),
    once per `key` (a step name and the mesh) in this process."""
    if key not in _COMPILED:
        _COMPILED[key] = make_jitted().lower(*args).compile(FAST_COMPILE)
    return _COMPILED[key]


def run_sft(state: TrainState, mesh, steps) -> tuple[TrainState, list[float]]:
    """SFT steps on the batches numbered `steps` (each process feeds its rows)."""
    tx = make_optimizer(OPTIM, total_steps=100)
    losses = []
    for i in steps:
        batch = parallel.shard_batch(local_rows(sft_batch(i), mesh), mesh)
        step_fn = compiled(("sft", mesh), lambda: sharded.jit_step(make_sft_step(CFG, tx), state, batch, mesh),
                           state, batch)
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def run_ppo(state: TrainState, mesh, steps) -> tuple[TrainState, list[float]]:
    """Score pass + advantages, then one `ppo_step` update, per fake rollout numbered in `steps`."""
    tx = make_optimizer(OPTIM, total_steps=100)
    ref = place_params(host_params_init(CFG, seed=1), mesh)
    losses = []
    for i in steps:
        rollout = parallel.shard_batch(local_rows(rollout_batch(i), mesh), mesh)
        prep_fn = compiled(("prepare", mesh), lambda: jax.jit(prepare, out_shardings=parallel.batch_sharding(mesh, 2)),
                           state.params, ref, rollout)
        mb = prep_fn(state.params, ref, rollout)
        step_fn = compiled(("ppo", mesh), lambda: sharded.jit_step(ppo_step.make_ppo_update(CFG, tx, PPO), state, mb,
                                                                   mesh), state, mb)
        state, m = step_fn(state, mb)
        losses.append(float(m["loss"]))
    return state, losses


def train(mesh) -> tuple[TrainState, list[float]]:
    """SFT_STEPS SFT steps then PPO_STEPS PPO updates from the fixed initial state."""
    state = init_state(mesh, make_optimizer(OPTIM, total_steps=100))
    state, sft_losses = run_sft(state, mesh, range(SFT_STEPS))
    state, ppo_losses = run_ppo(state, mesh, range(PPO_STEPS))
    return state, sft_losses + ppo_losses


def host_params(state: TrainState) -> dict[str, np.ndarray]:
    """Every param as a full numpy array, keyed by path (a collective in a multi-process job)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        params = jax.device_get(state.params)
    else:
        params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _say(what: str) -> None:
    """Progress on stderr with timestamps, so a hung or slow run shows where it was."""
    print(f"[worker {os.environ.get('JAX_PROCESS_ID', '?')} {time.monotonic() - _T0:6.1f}s] {what}",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    # Unset ones come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.process_id is not None:
        os.environ["JAX_PROCESS_ID"] = str(args.process_id)  # (for the progress lines only)
    _say("start")

    joined = distributed.initialize(distributed.DistributedConfig(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout=60))
    assert joined == (jax.process_count() > 1) == distributed.initialize()  # idempotent
    _say("joined")
    report: dict = {"process": jax.process_index(), "local_devices": jax.local_device_count(),
                    "devices": jax.device_count()}

    # Host work split and gathered: ragged lists of objects and ragged arrays, in order.
    words = [f"w{i}" for i in range(11)]
    mine = distributed.split_for_process(words)
    report["gathered_words"] = distributed.gather_from_processes([w.upper() for w in mine])
    arr = np.arange(len(mine) * 3, dtype=np.float32).reshape(-1, 3) + 100 * jax.process_index()
    report["gathered_rows"] = distributed.gather_from_processes(arr).tolist()

    _say("gathered")
    mesh = parallel.make_mesh(MESH)
    rows = distributed.process_batch_slice(BATCH, mesh)
    report["batch_slice"] = [rows.start, rows.stop]
    state, losses = train(mesh)
    report["losses"] = losses
    _say("trained")

    with Checkpointer(out / "ckpt") as ckpt:  # every process writes its shards
        ckpt.save(SFT_STEPS + PPO_STEPS, state, {"losses": losses})
        ckpt.wait()
    _say("checkpointed")
    params = host_params(state)
    if distributed.is_primary():
        np.savez(out / "params.npz", **params)
    (out / f"report{jax.process_index()}.json").write_text(json.dumps(report))
    distributed.sync("worker_done")
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
