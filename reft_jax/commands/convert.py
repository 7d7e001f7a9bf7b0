"""`reft convert SRC DST`: a GGUF file or HF directory in, a transformers directory out.

Goes through our own param tree (import then export), so a successful conversion is also a
check of both directions of the layout mapping. The value head is not exported.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable

from reft_jax.model.hf_layout import ModelLoadError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a .gguf file or an HF model directory")
    parser.add_argument("dst", help="output directory (created; existing weights are replaced)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weight dtype to write (default: float32)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0,
                        help="split the safetensors into files of at most this size")


def reports_load_errors(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Turn a `ModelLoadError` (bad input) into one clear stderr line and exit status 2,
    instead of a traceback; other exceptions are bugs and keep theirs."""

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except ModelLoadError as e:
                print(f"reft {command}: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


@reports_load_errors("convert")
def run(args: argparse.Namespace) -> int:
    from reft_jax.model.io import load_config, load_model, save_hf

    t0 = time.perf_counter()
    overrides = {"param_dtype": args.dtype} if args.dtype else {}
    print(f"reading {args.src} ...", flush=True)
    config, params, tokenizer = load_model(args.src, **overrides)
    n = config.num_params(include_value_head=False)
    print(f"{config.architecture}: {n / 1e6:.1f}M params, {config.num_layers} layers "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    out = save_hf(args.dst, config, params, tokenizer, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    load_config(out)  # the export must be readable by our own importer too
    note = "" if tokenizer is not None else " (no tokenizer in the source: none written)"
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s{note}")
    return 0
