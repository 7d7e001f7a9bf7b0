"""Pieces every SFT -> warm-up -> ReFT experiment shares (`reft demo`, `reft experiment small`).

* `seed_configs`: one seed's SFT and PPO configs from an experiment config that has `run_dir`,
  `mesh`, `sft` and `ppo`: run directories `run_dir/seed<S>/{sft,ppo}`, PPO starting from that
  SFT run's checkpoint named by `ppo.model.step` (the warm-up), and PPO on `sft.data` (the same
  training questions for both phases, and the same test questions).
* `validate_phases`: the checks such a config makes of itself.
* `evaluate_checkpoints`: load checkpoints of those runs and evaluate each on the test split
  (greedy top-1, and voting@k / pass@k with `vote_k`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, NamedTuple


class Policy(NamedTuple):
    """A checkpoint to evaluate: run directory, selector (best | warmup | epoch:K | ...), the
    evaluation prefix (`sft` for SFT checkpoints, `rollout` for PPO ones) and the EvalConfig."""

    run_dir: str
    selector: str
    prefix: str
    eval: Any


def seed_configs(cfg: Any, seed: int) -> tuple[Any, Any]:
    """(SFTConfig, PPOConfig) of one seed of `cfg` (a DemoConfig or an ExperimentConfig)."""
    root = pathlib.Path(cfg.run_dir) / f"seed{seed}"
    sft = dataclasses.replace(cfg.sft, run_dir=str(root / "sft"), seed=seed, mesh=cfg.mesh)
    model = dataclasses.replace(cfg.ppo.model, path=str(root / "sft"))
    ppo = dataclasses.replace(cfg.ppo, run_dir=str(root / "ppo"), seed=seed, mesh=cfg.mesh, model=model,
                              data=cfg.sft.data)
    return sft, ppo


def validate_phases(cfg: Any) -> None:
    """What every SFT -> ReFT experiment config checks: seeds, `vote_k`, and the PPO phase on
    `sft.data` (each phase was validated alone; this fails at load time, not after SFT ran)."""
    from reft_jax import config as config_lib

    if not cfg.seeds:
        raise config_lib.ConfigError("needs at least one seed", key="seeds", value=cfg.seeds)
    if cfg.vote_k < 0:
        raise config_lib.ConfigError("must be >= 0", key="vote_k", value=cfg.vote_k)
    try:
        seed_configs(cfg, cfg.seeds[0])[1].validate()
    except ValueError as err:
        raise config_lib.ConfigError(f"{err} (the PPO phase runs on sft.data)", key="ppo") from None


def evaluate_checkpoints(mesh_cfg: Any, data: Any, policies: Mapping[str, Policy], seed: int,
                         vote_k: int = 0) -> dict[str, dict[str, Any]]:
    """Each policy's `evaluate` result on the test split of `data` (as `load_examples(data,
    seed)` cuts it): `{name: {"metrics", "predictions", "meta"}}`, `meta` being the loaded
    checkpoint's (epoch, step, ...). Sampling for voting uses `jax.random.key(seed)`."""
    import jax

    from reft_jax.data.splits import load_examples
    from reft_jax.eval.evaluate import evaluate
    from reft_jax.parallel import build_mesh
    from reft_jax.reward.sandbox import ProgramExecutor
    from reft_jax.train.run import load_run_params

    mesh = build_mesh(mesh_cfg)
    test = load_examples(data, seed).test
    out: dict[str, dict[str, Any]] = {}
    executor = ProgramExecutor() if data.engine == "python" else None
    try:
        for name, policy in policies.items():
            model_config, params, tokenizer, meta = load_run_params(policy.run_dir, policy.selector, mesh)
            result = evaluate(params, model_config, tokenizer, test, data, policy.eval, jax.random.key(seed), mesh,
                              executor, vote_k=vote_k, prefix=policy.prefix,
                              clean_up_spaces=policy.eval.clean_up_spaces)
            out[name] = {"metrics": result["metrics"], "predictions": result["predictions"],
                         "meta": {k: v for k, v in meta.items() if k != "config"}}
            del params
    finally:
        if executor is not None:
            executor.close()
    return out
