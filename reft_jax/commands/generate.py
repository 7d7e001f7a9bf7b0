"""`reft generate`: load a model (HF directory or GGUF) and greedily continue a prompt.

Decoding goes through the sampler's host API (`reft_jax.rollout.generation`). `greedy_fn` below is the
original minimal greedy loop, kept as an independent reference for the importer's parity tests.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from reft_jax.commands.convert import reports_load_errors
from reft_jax.model.config import ModelConfig
from reft_jax.model.llama import forward, init_cache, positions_from_mask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: the SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user turn with the tokenizer's chat template")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute and parameter dtype")


def greedy_fn(config: ModelConfig, max_new_tokens: int):
    """A jitted `(params, tokens, mask, eos_id) -> [B, max_new_tokens]` greedy continuation of
    left-padded `tokens`. After a row emits `eos_id` it keeps emitting it; the loop stops early
    once every row has finished. (ModelConfig is unhashable, so it is closed over, not static.)"""

    def generate(params, tokens: jax.Array, mask: jax.Array, eos_id: jax.Array) -> jax.Array:
        b, t = tokens.shape
        cache = init_cache(config, b, t + max_new_tokens)
        positions = positions_from_mask(mask)
        logits, _, cache = forward(params, tokens, positions, mask, config, cache)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
        state = (jnp.int32(1), first, positions[:, -1] + 1, cache, out, first == eos_id)

        def cond(s):
            step, *_, done = s
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(s):
            step, tok, pos, cache, out, done = s
            logits, _, cache = forward(params, tok[:, None], pos[:, None], jnp.ones((b, 1), bool),
                                       config, cache)
            nxt = jnp.where(done, eos_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
            return step + 1, nxt, pos + 1, cache, out, done | (nxt == eos_id)

        return jax.lax.while_loop(cond, body, state)[4]

    return jax.jit(generate)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) int32 / bool arrays with every row right-aligned."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return tokens, mask


@reports_load_errors("generate")
def run(args: argparse.Namespace) -> int:
    from reft_jax.model.io import load_model, smollm2_gguf_path

    path = args.model or str(smollm2_gguf_path())
    print(f"loading {path} ({args.dtype}) on {jax.devices()[0].platform} ...", flush=True)
    t0 = time.perf_counter()
    config, params, tokenizer = load_model(path, dtype=args.dtype, param_dtype=args.dtype)
    if tokenizer is None:
        print(f"reft generate: error: {path} has no tokenizer", file=sys.stderr)
        return 2
    n = config.num_params(include_value_head=False)
    print(f"loaded {config.architecture}: {n / 1e6:.1f}M params, {config.num_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size} in {time.perf_counter() - t0:.1f} s")

    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # BatchEncoding in v5
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    from reft_jax.rollout.generation import generate
    from reft_jax.rollout.sampler import SampleConfig

    print(f"prompt: {len(ids)} tokens; generating up to {args.max_new_tokens} greedily", flush=True)
    t0 = time.perf_counter()
    result = generate(params, config, tokenizer, [ids], SampleConfig(max_new_tokens=args.max_new_tokens, greedy=True),
                      jax.random.key(0), batch_size=1, progress=False)
    seconds = time.perf_counter() - t0
    new = result.completion_ids[0][0]
    print(f"generated {len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tok/s, "
          f"prefill and compilation included)")
    print("-" * 60)
    print(result.texts[0][0])
    return 0
