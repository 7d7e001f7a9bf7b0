"""Jitting pure train steps with explicit shardings and donation.

Every phase (SFT, PPO, verifier, self-training) has a step `step(state, batch) -> (state,
metrics)`. This module compiles such a step once for a mesh: the state keeps the shardings it was
created with (params by the logical rules, optimizer moments following their params), the batch is
split over ('data', 'fsdp'), metrics are replicated, and the input state is donated.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from reft_jax import parallel
from reft_jax.train.state import TrainState


def tree_shardings(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, tree)


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Shardings for `tree` on `mesh`: NamedShardings on this mesh are kept, anything else
    (scalars created on one device, host arrays) becomes replicated."""

    def one(a):
        sh = getattr(a, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
            return sh
        return parallel.replicated(mesh)

    return jax.tree.map(one, tree)


def place(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of a state tree onto the mesh (no-op for leaves already there)."""
    return jax.device_put(tree, on_mesh(tree, mesh))


def state_shardings(params: Any, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of `TrainState.create(params, tx, rng)`: every optimizer leaf shaped like a
    param (AdamW's m and v) is sharded like that param, the rest replicated. (Left to XLA, the
    zero-initialised moments come out replicated: 2x the params on every device.)"""
    p_sh = on_mesh(params, mesh)
    rep = parallel.replicated(mesh)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt, p_sh, transform_non_params=lambda _: rep)
    return TrainState(params=p_sh, opt_state=opt_sh, step=rep, rng=rep)


def create_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh) -> TrainState:
    """`TrainState.create` on the mesh with the optimizer state sharded like the params."""
    return jax.jit(lambda p, r: TrainState.create(p, tx, r),
                   out_shardings=state_shardings(params, tx, mesh))(params, rng)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: parallel.batch_sharding(mesh, len(x.shape)), batch)


def jit_step(step: Callable, state: Any, batch_example: Any, mesh: Mesh, donate: bool = True):
    """Compile `step(state, batch)` with the state's own shardings in and out, traced with `mesh`
    as the context mesh so the model's activation constraints (`parallel.constrain`) apply."""
    st_sh = tree_shardings(state)
    return jax.jit(
        parallel.on_mesh_context(step, mesh),
        in_shardings=(st_sh, batch_shardings(batch_example, mesh)),
        out_shardings=(st_sh, parallel.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
