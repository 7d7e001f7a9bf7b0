"""`reft experiment small`: ReFT vs SFT on a real small model (SmolLM2-135M-Instruct), one command.

    reft experiment small --dataset svamp --cot python                    # --budget gpu-8min (one H200)
    reft experiment small --dataset svamp --cot python --budget cpu-tiny  # a CPU smoke run, minutes
    reft experiment small --dataset svamp --cot python --budget paper --seeds 0 1 2
    reft experiment small --config my.yaml ppo.optim.lr=1e-5              # any ExperimentConfig

The budget picks experiments/configs/small/experiment_<dataset>_<cot>_<budget>.yaml (dashes
dropped: gpu-8min -> gpu8min). Writes RUN_DIR/table.md, results.json and accuracy.png.
"""
from __future__ import annotations

import argparse
import sys

from reft_jax.data.formats import ENGINES

KINDS = ("small",)
BUDGETS = ("gpu-8min", "cpu-tiny", "paper")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which experiment (small: the paper's small-model Table 5)")
    parser.add_argument("--dataset", default="svamp", help="gsm8k | svamp | mathqa (default svamp)")
    parser.add_argument("--cot", default="python", choices=ENGINES, help="P-CoT (python, default) or N-CoT (nl)")
    parser.add_argument("--budget", default="gpu-8min",
                        help=f"{' | '.join(BUDGETS)} or any NAME with a config experiment_<dataset>_<cot>_NAME.yaml "
                             "(default gpu-8min: about 8 minutes on one H200, SHORTENED vs the paper)")
    parser.add_argument("--config", help="an ExperimentConfig YAML instead of the budget's")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the config's)")
    parser.add_argument("--run-dir", help="where to write (default: the config's, runs/experiment_small/...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. ppo.epochs=2 sft.optim.lr=1e-5 vote_k=8")


def run(args: argparse.Namespace) -> int:
    from reft_jax.commands._training import run_training
    from reft_jax.experiment.small import CONFIG_DIR, ExperimentConfig, config_path, run_small
    from reft_jax.train.loop import TrainingDiverged

    if args.config is None:
        path = config_path(args.dataset, args.cot, args.budget)
        if not path.is_file():
            known = sorted(p.name for p in CONFIG_DIR.glob("experiment_*.yaml")) if CONFIG_DIR.is_dir() else []
            print(f"reft experiment: error: no config {path.name} for --dataset {args.dataset} --cot {args.cot} "
                  f"--budget {args.budget} in {CONFIG_DIR}; available: {', '.join(known) or 'none'} "
                  "(or pass --config FILE)", file=sys.stderr)
            return 2
        args.config = str(path)
    flags = []
    if args.seeds:
        flags.append(f"seeds=[{','.join(map(str, args.seeds))}]")
    if args.run_dir:
        flags.append(f"run_dir={args.run_dir}")
    args.overrides = flags + list(args.overrides)
    return run_training(f"experiment {args.kind}", ExperimentConfig, run_small, args, diverged=(TrainingDiverged,),
                        print_summary=False)
