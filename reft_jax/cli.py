"""The `reft` command: one entry point, one subcommand per workflow.

Each subcommand lives in its own module under `reft_jax.commands` exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their
subcommand runs, so `reft --help` stays fast and light.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line purpose). The order is the order of the workflow.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("reft_jax.commands.demo", "SFT warm-up -> ReFT PPO -> evaluation on embedded synthetic problems"),
    "experiment": ("reft_jax.commands.experiment", "ReFT vs SFT on SmolLM2-135M: SFT, warm-up, PPO, table, plot"),
    "sft": ("reft_jax.commands.sft", "supervised fine-tuning (the warm-up phase) from a YAML config"),
    "ppo": ("reft_jax.commands.ppo", "ReFT PPO from an SFT checkpoint"),
    "selftrain": ("reft_jax.commands.selftrain", "offline / online self-training baselines"),
    "eval": ("reft_jax.commands.eval", "evaluate a checkpoint: greedy top-1, voting@k, rerank@k"),
    "sample": ("reft_jax.commands.sample", "sample completions for prompts or a ReFT data file"),
    "rerank": ("reft_jax.commands.rerank", "train a verifier (reranker) on sampled solutions"),
    "score": ("reft_jax.commands.score", "score predictions against gold answers (P-CoT in the sandbox)"),
    "convert": ("reft_jax.commands.convert", "convert a GGUF file or HF directory to an HF directory"),
    "report": ("reft_jax.commands.report", "paper-style table and plots from run directories"),
    "generate": ("reft_jax.commands.generate", "load a model and generate text for a prompt"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in SUBCOMMANDS.items()
        if importlib.util.find_spec(spec[0]) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reft", description="ReFT in JAX/Flax")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, purpose) in _available().items():
        sub.add_parser(name, help=purpose, description=purpose, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = _available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(available)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(available[name][0])
    parser = argparse.ArgumentParser(prog=f"reft {name}", description=available[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
