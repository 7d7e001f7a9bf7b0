"""`reft ppo --config FILE [key.sub=value ...]`: ReFT's PPO stage from an SFT warm-up.

Running the same command again after an interruption continues the run from its latest
checkpoint in `run_dir`, exactly.
"""
from __future__ import annotations

import argparse

from reft_jax.commands._training import add_config_arguments, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "PPOConfig", "model.path=runs/sft optim.lr=1e-6 kl_coef=0.05")


def run(args: argparse.Namespace) -> int:
    from reft_jax.train.ppo import PPOConfig, run_ppo

    return run_training("ppo", PPOConfig, run_ppo, args)
