"""`reft eval --checkpoint DIR ...`: greedy top-1 (and voting@k / pass@k) of a checkpoint.

DIR is a reft run directory (pick the checkpoint with --step), an HF directory or a .gguf file.
Questions come from a ReFT-format JSON file (--data) or a named dataset's test split (--dataset).
"""
from __future__ import annotations

import argparse
import pathlib
import json
import sys

from reft_jax.data.formats import ENGINES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="reft run directory, HF directory or .gguf file")
    parser.add_argument("--step", default="latest", help="latest | best | warmup | epoch:K | <step> (run dirs)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a ReFT-format JSON file (item_id, question, answer_value)")
    source.add_argument("--dataset", help="gsm8k | svamp | mathqa | mathqa-numeric | synthetic (its test split)")
    parser.add_argument("--engine", required=True, choices=ENGINES, help="N-CoT or P-CoT")
    parser.add_argument("--vote", type=int, default=0, metavar="K", help="also voting@K and pass@K")
    parser.add_argument("--strategy", choices=("greedy", "vote", "rerank"), default=None,
                        help="greedy top-1 only; vote: + voting@K; rerank: + rerank@K (and voting@K) "
                             "with --verifier (default: vote if --vote, else greedy)")
    parser.add_argument("--k", type=int, default=0, help="samples per question for vote / rerank")
    parser.add_argument("--verifier", default=None, help="verifier run directory (reft rerank train)")
    parser.add_argument("--verifier-step", default="best", help="latest | best | <step> of the verifier")
    parser.add_argument("--out", default=None, help="write per-example predictions here (JSONL)")
    parser.add_argument("--prefix", default="sft", choices=("sft", "rollout"),
                        help="sft: Question/Answer reasoning prompt (SFT eval); rollout: + the "
                             "`def solution():` header for P-CoT (RL eval)")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate the first N only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--max-total-len", type=int, default=1024,
                        help="prompt + completion cap (ReFT: 1024 after SFT, 700 after RL)")
    parser.add_argument("--max-prompt-len", type=int, default=300, help="prompt tokens kept (the head)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program (P-CoT)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $REFT_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for --vote")
    parser.add_argument("--mesh", default="1,-1,1", metavar="DATA,FSDP,TENSOR",
                        help="mesh axis sizes (-1: the remaining devices; fewer than all: the first ones)")


def run(args: argparse.Namespace) -> int:
    from reft_jax import config as config_lib
    from reft_jax.checkpoint import CheckpointError, plain_warnings
    from reft_jax.data.sources import DataError
    from reft_jax.model.io import ModelLoadError

    try:
        with plain_warnings("eval"):  # a damaged checkpoint skipped: one warning line each
            return _evaluate(args)
    except (config_lib.ConfigError, DataError, ModelLoadError, FileNotFoundError, ValueError,
            CheckpointError) as err:
        # (train.verifier.VerifierError is a ValueError: a mismatched verifier lands here too)
        print(f"reft eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reft eval: interrupted; nothing was written", file=sys.stderr)
        return 130


def _examples(args: argparse.Namespace) -> tuple[str, list]:
    """(dataset name for answer parsing, rows): a file names its dataset by its item_id prefix."""
    from reft_jax.data import sources

    if args.data:
        rows = sources.load_reft_json(args.data)
        name = rows[0].item_id.rsplit("_", 1)[0]
    elif args.dataset == "synthetic" and (pathlib.Path(args.checkpoint) / "config.yaml").is_file():
        # A run on synthetic problems is evaluated on the test split of its own generator knobs.
        import yaml

        from reft_jax.data.sources import DataConfig

        saved = (yaml.safe_load((pathlib.Path(args.checkpoint) / "config.yaml").read_text()) or {}).get("data", {})
        name = "synthetic"
        rows = sources.load_config_dataset(
            DataConfig(dataset="synthetic", engine=args.engine, synthetic=saved.get("synthetic") or {}), "test")
    else:
        name = args.dataset
        rows = sources.load_dataset(name, "test", args.engine, args.data_dir)
    return name, rows[: args.max_examples]


def _evaluate(args: argparse.Namespace) -> int:
    import jax

    from reft_jax import distributed
    from reft_jax.eval import evaluate as ev
    from reft_jax.parallel import MeshConfig
    from reft_jax.train.run import DataConfig, EvalConfig, ModelSpec, build_policy, is_run_dir, load_run_params
    from reft_jax.parallel import build_mesh

    strategy = args.strategy or ("vote" if args.vote else "greedy")
    k = args.k or args.vote
    if strategy != "greedy" and k < 1:
        raise ValueError(f"--strategy {strategy} needs --k K (samples per question)")
    if (strategy == "rerank") != bool(args.verifier):
        raise ValueError("--strategy rerank goes with --verifier DIR (and only it)")
    args.vote = k if strategy == "vote" else 0
    distributed.initialize()
    name, rows = _examples(args)
    data_cfg = DataConfig(dataset=name, engine=args.engine, data_dir=args.data_dir,
                          max_prompt_len=args.max_prompt_len)
    data_cfg.validate()
    eval_cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          max_total_len=args.max_total_len, vote_k=args.vote, timeout=args.timeout)
    mesh = build_mesh(MeshConfig(*(int(x) for x in args.mesh.split(","))))
    spec = ModelSpec(path=args.checkpoint, step=args.step)
    spec.validate()
    meta = None
    if is_run_dir(args.checkpoint):  # its meta names the step restored (latest falls back past damage)
        model_config, params, tokenizer, meta = load_run_params(args.checkpoint, args.step, mesh,
                                                                **spec.overrides())
    else:
        model_config, params, tokenizer = build_policy(spec, mesh, seed=args.seed)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer")
    print(f"evaluating {args.checkpoint} ({args.step}) on {len(rows)} {name} questions, {args.engine}, "
          f"prefix {args.prefix}" + (f", voting@{args.vote}" if args.vote else ""), flush=True)
    executor = None
    if args.engine == "python":
        from reft_jax.reward.sandbox import ProgramExecutor, SandboxConfig

        executor = ProgramExecutor(SandboxConfig(timeout=args.timeout)).start()
    try:
        result = ev.evaluate(params, model_config, tokenizer, rows, data_cfg, eval_cfg,
                             jax.random.key(args.seed), mesh, executor, vote_k=args.vote,
                             prefix=args.prefix, show_progress=True, clean_up_spaces=eval_cfg.clean_up_spaces)
        if strategy == "rerank":
            from reft_jax.train.verifier import evaluate_rerank

            metrics, picks = evaluate_rerank(params, model_config, tokenizer, rows, data_cfg, eval_cfg, k,
                                             jax.random.key(args.seed + 1), mesh, args.verifier,
                                             args.verifier_step, executor, args.prefix)
            result["metrics"].update({key: v for key, v in metrics.items() if key != "num_questions"})
            for record, pick in zip(result["predictions"], picks):
                record["rerank"] = pick
    finally:
        if executor is not None:
            executor.close()
    if args.out and jax.process_index() == 0:
        print(f"predictions -> {ev.write_predictions(args.out, result['predictions'])}")
    print(json.dumps(result["metrics"], indent=2))
    if meta is not None:
        _record(args, strategy, k, result["metrics"], meta)
    return 0


def _record(args: argparse.Namespace, strategy: str, k: int, metrics: dict, meta: dict) -> None:
    """A reft run directory keeps the result for `reft report` (full test split only), with the
    epoch and step of the checkpoint evaluated (`meta`: the one restored)."""
    import jax

    from reft_jax.eval.report import write_eval_summary

    if args.max_examples is None and jax.process_index() == 0:
        path = write_eval_summary(args.checkpoint, strategy, k, args.step, metrics,
                                  meta.get("epoch_end", meta.get("epoch")), meta.get("step"),
                                  verifier=args.verifier, prefix=args.prefix)
        print(f"summary -> {path}")
