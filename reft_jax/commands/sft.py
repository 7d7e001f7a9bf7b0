"""`reft sft --config FILE [key.sub=value ...]`: supervised fine-tuning (the ReFT warm-up).

Running the same command again after an interruption continues the run from its latest
checkpoint in `run_dir`, exactly.
"""
from __future__ import annotations

import argparse

from reft_jax.commands._training import add_config_arguments, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "SFTConfig", "optim.lr=2e-5 data.max_train_examples=100")


def run(args: argparse.Namespace) -> int:
    from reft_jax.train.sft import SFTConfig, run_sft

    return run_training("sft", SFTConfig, run_sft, args)
