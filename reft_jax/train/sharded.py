"""Jitting pure train steps with explicit shardings and donation.

Every phase (SFT, PPO, verifier, self-training) has a step `step(state, batch) -> (state,
metrics)`. This module compiles such a step once for a mesh: the state keeps the shardings it was
created with (params by the logical rules, optimizer moments following their params), the batch is
split over ('data', 'fsdp'), metrics are replicated, and the input state is donated.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh

from reft_jax import parallel


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


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: parallel.batch_sharding(mesh, len(x.shape)), batch)


def jit_step(step: Callable, state: Any, batch_example: Any, mesh: Mesh, donate: bool = True):
    """Compile `step(state, batch)` with the state's own shardings in and out."""
    st_sh = tree_shardings(state)
    return jax.jit(
        step,
        in_shardings=(st_sh, batch_shardings(batch_example, mesh)),
        out_shardings=(st_sh, parallel.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
