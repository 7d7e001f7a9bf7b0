"""`reft score`: score predictions against gold answers with ReFT's reward (P-CoT in the sandbox).

    reft score preds.jsonl --dataset gsm8k --engine python [--data gsm8k_test_set.json] [--out scored.jsonl]
    reft score --reference ../shared/data/reft/svamp_python_sdp.json --engine python

Each input line holds `completion` (the text after the CoT trigger; for P-CoT the program from
`def solution():`) and `answer_value`, or an `item_id` looked up in `--data FILE` (a ReFT JSON
file). `--reference DATAFILE` scores a dataset's own `answer_cot` (N-CoT with ReFT's answer line
appended): a check that extraction and execution reproduce every gold answer.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import sys
import time

from reft_jax.data.formats import ENGINES
from reft_jax.data.prompts import sft_target
from reft_jax.data.sources import (DATASETS, DataError, check_answer, load_gsm8k_jsonl,
                                   load_reft_json, read_jsonl_object, require_str)
from reft_jax.reward.answers import answer_kind
from reft_jax.reward.reward import RewardConfig, score_completions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", nargs="?", help="JSONL: completion + answer_value (or item_id)")
    parser.add_argument("--dataset", choices=[d for d in DATASETS if d != "synthetic"] + ["synthetic"],
                        help="answer kind source (default: from the item ids)")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--data", help="ReFT JSON file to look up gold answers by item_id")
    parser.add_argument("--reference", help="score this data file's own answer_cot instead")
    parser.add_argument("--out", help="write one JSON line per input: prediction, status, reward")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per program (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="sandbox workers (default: cores)")
    parser.add_argument("--partial-reward", type=float, default=0.1)
    parser.add_argument("--mcq-invalid-zero", action="store_true",
                        help="reward 0 (not 0.1) for MCQ predictions that are not a letter a-e")


def _load_rows(path: pathlib.Path):
    return load_gsm8k_jsonl(path) if path.suffix == ".jsonl" else load_reft_json(path)


def _reference_inputs(args) -> tuple[list[str], list[str], list[str | None], str]:
    rows = _load_rows(pathlib.Path(args.reference))
    missing = next((r.item_id for r in rows if r.answer_cot is None), None)
    if missing is not None:
        raise DataError("has no answer_cot to score (a test file?)", args.reference, missing, "answer_cot")
    dataset = args.dataset or rows[0].item_id.rsplit("_", 1)[0]
    return ([sft_target(r, args.engine) for r in rows], [r.answer_value for r in rows],
            [r.item_id for r in rows], dataset)


def _prediction_inputs(args) -> tuple[list[str], list[str], list[str | None], str]:
    path = pathlib.Path(args.predictions)
    gold_rows = {r.item_id: r for r in _load_rows(pathlib.Path(args.data))} if args.data else {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror}", path) from None
    dataset = args.dataset
    completions, golds, ids = [], [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = read_jsonl_object(line, path, n)
        where = f"line {n}"
        completions.append(require_str(row, "completion", path, where, allow_empty=True))
        item_id = row.get("item_id")
        if "answer_value" in row:
            gold = row["answer_value"]
            if isinstance(gold, (int, float)) and not isinstance(gold, bool):
                gold = str(gold)
            if not isinstance(gold, str):
                raise DataError(f"expected a string or number, got {type(gold).__name__}", path, where, "answer_value")
        elif item_id is None:
            raise DataError("missing (give answer_value, or item_id with --data FILE)", path, where, "answer_value")
        elif not args.data:
            raise DataError("has only item_id: pass --data FILE to look up its gold answer", path, where, "item_id")
        elif item_id not in gold_rows:
            raise DataError(f"{item_id!r} is not in {args.data}", path, where, "item_id")
        else:
            gold = gold_rows[item_id].answer_value
        if dataset is None:
            dataset = str(item_id).rsplit("_", 1)[0]
            if item_id is None or dataset not in DATASETS:
                raise DataError("cannot tell the dataset from it: pass --dataset", path, where, "item_id")
        check_answer(gold, answer_kind(dataset), path, where)
        golds.append(gold)
        ids.append(item_id)
    if not completions:
        raise DataError("no predictions", path)
    return completions, golds, ids, dataset


def _json_safe(x):
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)


def run(args: argparse.Namespace) -> int:
    if bool(args.predictions) == bool(args.reference):
        print("reft score: give PREDICTIONS.jsonl or --reference DATAFILE (one of them)", file=sys.stderr)
        return 2
    try:
        completions, golds, ids, dataset = (_reference_inputs(args) if args.reference
                                            else _prediction_inputs(args))
        kind = answer_kind(dataset)
        if args.reference:
            for i, g in enumerate(golds):
                check_answer(g, kind, args.reference, i)
    except (DataError, ValueError) as err:
        print(f"reft score: {err}", file=sys.stderr)
        return 2
    cfg = RewardConfig(partial=args.partial_reward, mcq_invalid_zero=args.mcq_invalid_zero)
    executor = None
    start = time.perf_counter()
    if args.engine == "python":
        from reft_jax.reward.sandbox import ProgramExecutor

        executor = ProgramExecutor(timeout=args.timeout, workers=args.workers).start()
    try:
        scored = score_completions(completions, golds, kind, args.engine, executor, cfg)
        stats = executor.stats() if executor else {}
    finally:
        if executor is not None:
            executor.close()
    seconds = time.perf_counter() - start
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for i, (s, item_id) in enumerate(zip(scored, ids)):
                f.write(json.dumps({"index": i, "item_id": item_id, "prediction": _json_safe(s.prediction),
                                    "status": s.status, "reward": s.reward, "correct": s.correct,
                                    "detail": s.detail}) + "\n")
    n = len(scored)
    correct = sum(s.correct for s in scored)
    statuses = collections.Counter(s.status for s in scored)
    print(f"{dataset} {args.engine}: {n} predictions, accuracy {correct / n:.2%} ({correct}/{n}), "
          f"mean reward {sum(s.reward for s in scored) / n:.4f}")
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    if executor is not None:
        executed = stats.get("executed", 0)
        print(f"executor: {executed} programs run, {stats.get('cache_hits', 0)} cache hits, "
              f"{stats.get('worker_restarts', 0)} worker restarts, {seconds:.1f} s "
              f"({n / seconds:.0f} programs/s), timeout {args.timeout:g} s")
    return 0
