"""`reft selftrain --mode offline|online --config FILE [key.sub=value ...]`: ReFT's baselines.

The YAML file holds an `offline:` and / or an `online:` section (SelfTrainConfig); the mode runs
its section, and overrides name it (`online.epochs=1`). offline: the warm-up samples k
completions per train question (or `offline.samples` names a file from `reft sample`), each
question keeps <= 10 unique correct ones plus its gold CoT, and the base model is fine-tuned on
them and the original data with the SFT recipe (`offline.sft.*`). online: ReFT's rollout with a
supervised loss on the correct samples and the gold CoTs. Running the same command again
continues the run.
"""
from __future__ import annotations

import argparse

from reft_jax.commands._training import add_config_arguments, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, choices=("offline", "online"))
    add_config_arguments(parser, "SelfTrainConfig", "online.epochs=1 offline.k=16")


def run(args: argparse.Namespace) -> int:
    from reft_jax.train.selftrain import SelfTrainConfig, run_selftrain

    return run_training("selftrain", SelfTrainConfig, lambda cfg: run_selftrain(cfg, args.mode), args)
