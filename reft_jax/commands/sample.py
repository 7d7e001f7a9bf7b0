"""`reft sample`: sample completions for a prompts file, one JSON line per prompt.

    reft sample --model PATH --prompts FILE --out FILE.jsonl [--greedy | --temperature T --top-k K --top-p P]

PATH is an HF directory or a `.gguf` file. FILE is either a JSONL of objects with `prompt`, or a
ReFT data file (a JSON list with `question`), whose questions get ReFT's rollout prefix for
`--engine` (the P-CoT prefix ends with the program header). Each output line has `prompt` and
`completion` (or `completions`, a list, when `--n` > 1), plus `item_id` / `answer_value` when
the input has them. Defaults are ReFT's: pure sampling at temperature 1 (rollouts); ReFT's
Voting@100 sampling used transformers' default `--top-k 50` and 1024 total tokens.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any

from reft_jax.data.formats import ENGINES

PASS_THROUGH = ("item_id", "answer_value")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF directory or .gguf file")
    parser.add_argument("--prompts", required=True,
                        help="JSONL with a `prompt` per line, or a ReFT data JSON list with `question`")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--engine", choices=ENGINES, default="python",
                        help="prompt format for ReFT data files (default: python, i.e. P-CoT)")
    from reft_jax.data.prompts import HEADER_NEWLINE

    parser.add_argument("--header-newline", choices=HEADER_NEWLINE, default="auto",
                        help="end a P-CoT question's `def solution()` header with its newline: auto = where "
                             "the tokenizer keeps it a token apart (ReFT's newer branch), always = ReFT main")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (top-1)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (ReFT rollouts); ReFT's voting used 50")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-total-len", type=int, default=None,
                        help="cap on prompt (padded to the batch's longest) + completion, as HF's max_length")
    parser.add_argument("--max-prompt-len", type=int, default=1024,
                        help="prompt tokens kept (the head; ReFT's sampling.py: 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (each with --n rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute and parameter dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_prompts(path: str | pathlib.Path, engine: str, newline: bool = True) -> list[dict[str, Any]]:
    """Rows with `prompt` (and the pass-through fields) from a JSONL or a ReFT data file. Prompts
    built from questions end their P-CoT header with a newline or not (`header_newline`)."""
    from reft_jax.data.prompts import rollout_prefix
    from reft_jax.data.sources import DataError, load_reft_json, read_jsonl_object

    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [{"prompt": rollout_prefix(ex.question, engine, newline), "item_id": ex.item_id,
                 "answer_value": ex.answer_value} for ex in load_reft_json(path)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = read_jsonl_object(line, path, lineno)
        if "prompt" in row:
            prompt = row["prompt"]
        elif "question" in row:
            prompt = rollout_prefix(row["question"], engine, newline)
        else:
            raise DataError("needs a `prompt` (or `question`) field", path, f"line {lineno}")
        if not isinstance(prompt, str):
            raise DataError(f"expected a string, got {type(prompt).__name__}", path, f"line {lineno}", "prompt")
        rows.append({"prompt": prompt, **{k: row[k] for k in PASS_THROUGH if k in row}})
    if not rows:
        raise DataError("no prompts", path)
    return rows


def output_rows(rows: list[dict[str, Any]], texts: list[list[str]], n: int) -> list[dict[str, Any]]:
    out = []
    for row, samples in zip(rows, texts):
        line: dict[str, Any] = {"prompt": row["prompt"]}
        if n == 1:
            line["completion"] = samples[0]
        else:
            line["completions"] = samples
        line.update({k: row[k] for k in PASS_THROUGH if k in row})
        out.append(line)
    return out


def sample_config_from_args(args: argparse.Namespace):
    from reft_jax.rollout.sampler import SampleConfig

    return SampleConfig(max_new_tokens=args.max_new_tokens, max_total_len=args.max_total_len,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        greedy=args.greedy, n=args.n)


def run(args: argparse.Namespace) -> int:
    import jax

    from reft_jax.data.sources import DataError
    from reft_jax.rollout.generation import generate
    from reft_jax.model.io import ModelLoadError, load_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = sample_config_from_args(args)
        rows = read_prompts(args.prompts, args.engine)
    except (ValueError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = pathlib.Path(args.model)
    if model.is_dir() and (model / "checkpoints").is_dir():
        print(f"error: {model} is a reft run directory; loading reft checkpoints here is not supported yet "
              "(export it to an HF directory first)", file=sys.stderr)
        return 2
    try:
        model_config, params, tokenizer = load_model(model, dtype=args.dtype, param_dtype=args.dtype)
    except (ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {model} has no tokenizer", file=sys.stderr)
        return 2
    if args.engine == "python":  # questions become prompts as this tokenizer needs (read above to fail early)
        from reft_jax.data.prompts import header_newline

        rows = read_prompts(args.prompts, args.engine, header_newline(tokenizer, args.header_newline))
    start = time.perf_counter()
    result = generate(params, model_config, tokenizer, [r["prompt"] for r in rows], config,
                      jax.random.key(args.seed), batch_size=args.batch_size, progress=not args.no_progress,
                      max_prompt_len=args.max_prompt_len)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for line in output_rows(rows, result.texts, config.n):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - start
    print(f"{len(rows)} prompts x {config.n} samples, {result.num_tokens} tokens in {seconds:.1f} s "
          f"({result.num_tokens / max(seconds, 1e-9):.0f} tok/s, compilation included); "
          f"{result.num_truncated} prompts truncated; wrote {out}")
    return 0
