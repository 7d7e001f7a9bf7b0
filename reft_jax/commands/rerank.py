"""`reft rerank train|score`: the verifier (ReFT's reward-model reranker).

    reft rerank train --config FILE [key.sub=value ...]
    reft rerank score --verifier DIR --samples FILE --dataset NAME --engine nl|python [--out FILE]

train: `train_samples` is a samples JSONL of the train split (`reft sample --n 100` from the
warm-up checkpoint; lines without labels are scored here), `eval_samples` optionally the test
split sampled from the policy to rerank; `model.path` is that policy's run directory. score:
rerank a samples file with a trained verifier and print rerank@k, voting@k, pass@k.
"""
from __future__ import annotations

import argparse
import json
import sys

from reft_jax.commands._training import add_config_arguments, run_training
from reft_jax.data.formats import ENGINES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    add_config_arguments(sub.add_parser("train", help="train a verifier from a YAML config"), "VerifierConfig",
                         "optim.lr=1e-5 epochs=1")
    score = sub.add_parser("score", help="rerank a samples file with a trained verifier")
    score.add_argument("--verifier", required=True, help="verifier run directory")
    score.add_argument("--step", default="best", help="latest | best | <step> (default best)")
    score.add_argument("--samples", required=True, help="samples JSONL (e.g. from `reft sample --n K`)")
    score.add_argument("--dataset", required=True, help="gsm8k | svamp | mathqa | mathqa-numeric | synthetic")
    score.add_argument("--engine", required=True, choices=ENGINES)
    score.add_argument("--split", default="test", help="split to look questions / answers up in")
    score.add_argument("--data-dir", default=None)
    score.add_argument("--batch-size", type=int, default=24)
    score.add_argument("--out", default=None, help="write one JSON line per question (the pick)")


def _score(args: argparse.Namespace) -> int:
    import contextlib

    from reft_jax.eval.evaluate import write_predictions
    from reft_jax.eval.inference import load_sample_sets
    from reft_jax.parallel import MeshConfig
    from reft_jax.reward.answers import answer_kind
    from reft_jax.train.run import DataConfig
    from reft_jax.parallel import build_mesh
    from reft_jax.train.verifier import load_verifier, rerank

    data = DataConfig(dataset=args.dataset, engine=args.engine, data_dir=args.data_dir)
    with contextlib.ExitStack() as stack:
        sets = load_sample_sets(args.samples, data, args.split, stack)
    verifier = load_verifier(args.verifier, build_mesh(MeshConfig()), args.step)
    metrics, records = rerank(verifier, sets, answer_kind(args.dataset), args.batch_size)
    if args.out:
        print(f"picks -> {write_predictions(args.out, records)}")
    print(json.dumps(metrics, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    from reft_jax import config as config_lib
    from reft_jax.data.sources import DataError
    from reft_jax.train.verifier import VerifierError

    if args.action == "train":
        from reft_jax.train.verifier import VerifierConfig, train_verifier

        return run_training("rerank train", VerifierConfig, train_verifier, args)
    try:
        return _score(args)
    except (config_lib.ConfigError, DataError, VerifierError, FileNotFoundError) as err:
        print(f"reft rerank score: error: {err}", file=sys.stderr)
        return 2
