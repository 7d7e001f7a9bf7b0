"""The one training loop every trainer runs (SFT, PPO, self-training, the verifier)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

NAN_POLICIES = ("stop", "skip")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; nothing was saved after the last good step."""


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
