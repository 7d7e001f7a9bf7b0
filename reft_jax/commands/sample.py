"""`reft sample`: sample completions for questions or prompts, one JSON line per prompt.

    reft sample --model PATH [--step warmup|best|latest|epoch:K|N] (--prompts FILE | --dataset NAME --split S)
                --out FILE.jsonl [--engine nl|python] [--n N --temperature T --top-k K | --greedy]

PATH is a reft run directory (its checkpoint picked by `--step`, as `reft eval` does), an HF
directory or a `.gguf` file. The questions come from a dataset split (`--dataset`, `--split`;
`synthetic` uses the run's own generator knobs) or a file (`--prompts`): a ReFT data file (a JSON
list with `question`) or a JSONL of objects with `prompt` (used verbatim) or `question`. Questions
get ReFT's rollout prefix for the engine (P-CoT: the `def solution():` header, N-CoT: none); the
engine is `--engine`, else the run directory's `data.engine`. Each output line has `prompt` and
`completion` (or `completions`, a list, when `--n` > 1), plus `item_id` / `answer_value` when the
input has them: the samples JSONL that `reft rerank train|score` and `reft selftrain` read.

The defaults are those of ReFT's `sampling.py` (Voting@100, reranking and offline self-training
samples): temperature 1, top-k 50 (transformers' default, which it ran with), prompt + completion
capped at `--max-total-len 1024` tokens, prompts truncated to their first 1024 tokens, decoded
without cleaning up tokenisation spaces. `--top-k 0` is pure sampling, as ReFT's PPO rollouts.
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


class SampleError(ValueError):
    """A command-line mistake, reported in one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="reft run directory, HF directory or .gguf file")
    parser.add_argument("--step", default="latest",
                        help="checkpoint of a run directory: latest | best | warmup | epoch:K | <step>")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="JSONL with a `prompt` (or `question`) per line, or a ReFT data "
                                          "JSON list with `question`")
    source.add_argument("--dataset", help="gsm8k | svamp | mathqa | mathqa-numeric | synthetic: the questions "
                                          "of its --split (synthetic: the run's own generator knobs)")
    parser.add_argument("--split", choices=("train", "test"), default="test", help="split of --dataset")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $REFT_DATA_DIR)")
    parser.add_argument("--max-examples", type=int, default=None, help="the first N questions only")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="prompt format for questions: nl (N-CoT) or python (P-CoT, with the program "
                             "header); default: the run directory's data.engine")
    from reft_jax.data.prompts import HEADER_NEWLINE

    parser.add_argument("--header-newline", choices=HEADER_NEWLINE, default=None,
                        help="end a P-CoT question's `def solution()` header with its newline: auto = where "
                             "the tokenizer keeps it a token apart (ReFT's newer branch), always = ReFT main "
                             "(default: the run directory's data.header_newline, else auto)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (top-1)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50,
                        help="50 as ReFT's sampling.py (transformers' default); 0 = off, as ReFT's rollouts")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (ReFT's Table 4: 100)")
    parser.add_argument("--max-total-len", type=int, default=1024,
                        help="cap on prompt (padded to the batch's longest) + completion, HF's max_length "
                             "(ReFT's sampling.py: 1024)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on the completion alone (default: --max-total-len)")
    parser.add_argument("--max-prompt-len", type=int, default=1024,
                        help="prompt tokens kept (the head; ReFT's sampling.py: 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (each with --n rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute and parameter dtype")
    parser.add_argument("--mesh", default="1,-1,1", metavar="DATA,FSDP,TENSOR",
                        help="mesh axis sizes (-1: the remaining devices)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------
# Questions and prompts
# ----------------------------------------------------------------------------------------------
def read_prompts(path: str | pathlib.Path, engine: str | None, newline: bool = True) -> list[dict[str, Any]]:
    """Rows with `prompt` (and the pass-through fields) from a JSONL or a ReFT data file. Prompts
    built from questions (which need an `engine`) end their P-CoT header with a newline or not."""
    from reft_jax.data.sources import DataError, load_reft_json, read_jsonl_object

    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return question_rows(load_reft_json(path), engine, newline, str(path))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = read_jsonl_object(line, path, lineno)
        if "prompt" in row:
            prompt = row["prompt"]
        elif "question" in row:
            prompt = _prefix(row["question"], engine, newline, f"{path} line {lineno}")
        else:
            raise DataError("needs a `prompt` (or `question`) field", path, f"line {lineno}")
        if not isinstance(prompt, str):
            raise DataError(f"expected a string, got {type(prompt).__name__}", path, f"line {lineno}", "prompt")
        rows.append({"prompt": prompt, **{k: row[k] for k in PASS_THROUGH if k in row}})
    if not rows:
        raise DataError("no prompts", path)
    return rows


def question_rows(examples, engine: str | None, newline: bool, where: str) -> list[dict[str, Any]]:
    """One row per example: its rollout prefix (ReFT's sampling prompt), item_id, answer_value."""
    return [{"prompt": _prefix(ex.question, engine, newline, where), "item_id": ex.item_id,
             "answer_value": ex.answer_value} for ex in examples]


def _prefix(question: Any, engine: str | None, newline: bool, where: str) -> str:
    from reft_jax.data.prompts import rollout_prefix

    if engine is None:
        raise SampleError(f"{where}: questions need a prompt format: give --engine nl (N-CoT) or python "
                          "(P-CoT, with the program header)")
    return rollout_prefix(question, engine, newline)


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

    max_new = args.max_new_tokens
    if max_new is None:
        max_new = args.max_total_len if args.max_total_len is not None else 512
    return SampleConfig(max_new_tokens=max_new, max_total_len=args.max_total_len,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        greedy=args.greedy, n=args.n)


# ----------------------------------------------------------------------------------------------
# The model and the run it comes from
# ----------------------------------------------------------------------------------------------
def run_data_section(model: str | pathlib.Path) -> dict[str, Any]:
    """The `data` section of a reft run directory's config.yaml ({} for other models)."""
    import yaml

    path = pathlib.Path(model) / "config.yaml"
    if not path.is_file():
        return {}
    saved = yaml.safe_load(path.read_text()) or {}
    data = saved.get("data")
    return data if isinstance(data, dict) else {}


def resolve_engine(args: argparse.Namespace, run_data: dict[str, Any]) -> str | None:
    """--engine, else the run's data.engine, else None (prompts given verbatim need none)."""
    saved = run_data.get("engine")
    if args.engine and saved and args.engine != saved:
        print(f"note: {args.model} was trained with engine {saved}; sampling with --engine {args.engine}",
              file=sys.stderr)
    return args.engine or saved


def dataset_examples(args: argparse.Namespace, engine: str | None, run_data: dict[str, Any]) -> list:
    """The questions of `--dataset`'s `--split`: the run's own data section when it names the
    same dataset (its files, synthetic knobs, data directory), else the named dataset."""
    from reft_jax.data.sources import DataConfig, load_config_dataset

    if engine is None:
        raise SampleError(f"--dataset {args.dataset}: give --engine nl or python (the model is not a reft run "
                          "directory that records one)")
    known = {f for f in DataConfig.__dataclass_fields__}
    if run_data.get("dataset") == args.dataset:
        fields = {k: v for k, v in run_data.items() if k in known}
        fields.update(engine=engine, source=fields.get("source", "files"))
        cfg = DataConfig(**fields)
    else:
        cfg = DataConfig(dataset=args.dataset, engine=engine)
    if args.data_dir:
        cfg.data_dir = args.data_dir
    return load_config_dataset(cfg, args.split)


def load_policy(args: argparse.Namespace, mesh):
    """(model config, params, tokenizer) of --model / --step."""
    from reft_jax.train.run import ModelSpec, build_policy, is_run_dir

    model = pathlib.Path(args.model)
    if (model / "verifier.json").is_file():
        raise SampleError(f"{model} is a verifier run directory (reft rerank train), not a policy")
    if not is_run_dir(model) and args.step != "latest":
        raise SampleError(f"--step {args.step} picks a checkpoint of a reft run directory; {model} is not one")
    spec = ModelSpec(path=str(model), step=args.step, dtype=args.dtype, param_dtype=args.dtype)
    spec.validate()
    return build_policy(spec, mesh, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from reft_jax import config as config_lib
    from reft_jax.data.sources import DataError
    from reft_jax.model.io import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _sample(args)
    except (SampleError, config_lib.ConfigError, DataError, ModelLoadError, FileNotFoundError, OSError,
            ValueError) as err:
        print(f"reft sample: error: {err}", file=sys.stderr)
        return 2


def _sample(args: argparse.Namespace) -> int:
    import jax

    from reft_jax import distributed
    from reft_jax.data.prompts import header_newline
    from reft_jax.eval.evaluate import eval_batch_size, in_context_texts
    from reft_jax.parallel import MeshConfig, build_mesh
    from reft_jax.rollout.generation import generate

    config = sample_config_from_args(args)
    if args.max_examples is not None and args.max_examples < 1:
        raise SampleError(f"--max-examples must be >= 1, got {args.max_examples}")
    run_data = run_data_section(args.model)
    engine = resolve_engine(args, run_data)
    # read (and check) the questions before loading a model: mistakes fail in a second
    if args.prompts:
        rows = read_prompts(args.prompts, engine)
    else:
        examples = dataset_examples(args, engine, run_data)[: args.max_examples]
        rows = question_rows(examples, engine, True, f"--dataset {args.dataset}")
    rows = rows[: args.max_examples]
    distributed.initialize()
    mesh = build_mesh(MeshConfig(*(int(x) for x in args.mesh.split(","))))
    model_config, params, tokenizer = load_policy(args, mesh)
    if tokenizer is None:
        raise SampleError(f"{args.model} has no tokenizer")
    if engine == "python":  # questions become prompts as this tokenizer needs
        newline = header_newline(tokenizer, args.header_newline or run_data.get("header_newline") or "auto")
        if args.prompts:
            rows = read_prompts(args.prompts, engine, newline)[: args.max_examples]
        else:
            rows = question_rows(examples, engine, newline, f"--dataset {args.dataset}")
    where = f"{args.model}" + (f" ({args.step})" if run_data else "")
    print(f"sampling {len(rows)} prompts x {config.n} from {where}, engine {engine or 'none (prompts as given)'}, "
          f"temperature {config.temperature}, top-k {config.top_k}, top-p {config.top_p}"
          f"{', greedy' if config.greedy else ''}, max total {config.max_total_len}", flush=True)
    start = time.perf_counter()
    result = generate(params, model_config, tokenizer, [r["prompt"] for r in rows], config,
                      jax.random.key(args.seed), batch_size=eval_batch_size(args.batch_size, mesh), mesh=mesh,
                      progress=not args.no_progress, max_prompt_len=args.max_prompt_len)
    # decoded after their prompt, as ReFT decodes prompt + completion (SentencePiece keeps the
    # body's first space); sampling.py does not clean up tokenisation spaces
    texts = [in_context_texts(tokenizer, ids, comps, clean_up_spaces=False)
             for ids, comps in zip(result.prompt_ids, result.completion_ids)]
    out = pathlib.Path(args.out)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for line in output_rows(rows, texts, config.n):
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        tmp.replace(out)
    seconds = time.perf_counter() - start
    print(f"{len(rows)} prompts x {config.n} samples, {result.num_tokens} tokens in {seconds:.1f} s "
          f"({result.num_tokens / max(seconds, 1e-9):.0f} tok/s, compilation included); "
          f"{result.num_truncated} prompts truncated; wrote {out}")
    return 0
