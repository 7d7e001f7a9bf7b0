"""Sampler throughput on a named model shape against transformers' PyTorch `generate`, with rooflines.

    .venv/bin/python experiments/benchmarks/bench_sampler.py               # full run (minutes on CPU)
    .venv/bin/python experiments/benchmarks/bench_sampler.py --quick       # smoke run
    .venv/bin/python experiments/benchmarks/bench_sampler.py --one-core    # both pinned to one core
    python experiments/benchmarks/bench_sampler.py --shape codellama-7b --dtypes bfloat16 --batches 64 \
        --prompt-len 128 --new-tokens 256                                  # on a GPU

Weights are random, of the shape `--shape` names (`shapes.py`: tiny, smollm2-135m, llama-1b,
codellama-7b); `--gguf` loads the real SmolLM2-135M weights (and transformers from the same GGUF)
instead. transformers' model is a `LlamaForCausalLM` of the same shape (random weights) on the
same device as JAX: the GPU when there is one, where `generate` is what the official ReFT code
samples with.

For each dtype and batch size: our `reft_jax.rollout.sampler.sample` (greedy, and pure sampling as in
ReFT rollouts) and transformers' `generate` (greedy, same prompts, same number of new tokens,
no early stop), on the same random prompts of `--prompt-len` tokens. Throughput counts new
tokens, prefill included; compilation is reported apart. It is given per wall second and per
CPU second of the process: on a shared machine the wall clock measures the other processes
too, and multi-threaded runtimes suffer unequally (spinning OpenMP barriers); `--one-core`
runs both single-threaded on one core, where CPU seconds measure the work itself.

Roofline: the prefill's FLOPs at a large matmul's measured rate, plus per decode step the larger
of (bytes it must read: weights in the compute dtype, the logits head, the average KV cache) /
(copy bandwidth measured here) and (its FLOPs) / (matmul rate). "of bound" is the measured wall
throughput over that bound. "dot bound" is the same bound with the decode's FLOPs at the rate
XLA's dots reach at the decode's own shape (a chain of [batch, hidden] x [hidden, 2 * mlp]
products), the ceiling for any decode loop built on XLA's dots. On a GPU the same code measures
HBM bandwidth and the GPU's matmul rate (an 8192^3 matmul). torch is a test/benchmark-only dependency.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys


def _pin_one_core() -> None:
    """Before jax/torch start their thread pools: both then size them to one core."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


if "--one-core" in sys.argv:
    _pin_one_core()

# JAX takes 75% of a GPU at start unless told otherwise; transformers shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import shapes  # noqa: E402  (this folder is on sys.path when the script runs)
from shapes import timed as _timed  # noqa: E402


def measure_bandwidth() -> tuple[float, float]:
    """(JAX default device, NumPy host) copy bandwidth in GB/s, read + write counted."""
    dev, host = shapes.copy_bandwidth()
    return dev / 1e9, host / 1e9


def measure_matmul(dtype: str) -> float:
    """GFLOP/s of a large square matmul on the default device (8192^3 on an accelerator, else 2048^3)."""
    return shapes.matmul_peak(dtype, reps=3) / 1e9


def measure_decode_matmul(dtype: str, rows: int, d: int, f: int, layers: int = 30) -> float:
    """GFLOP/s of XLA's dots at a decode step's own shape: a chain of `layers` [rows, d] x [d, 2f]
    products (distinct weights, so each is read from memory as in a step). At 8-32 rows this is
    well below the large-matmul rate; it bounds what any decode built on XLA's dots can reach."""
    ws = [jnp.full((d, 2 * f), 1e-3, dtype) for _ in range(layers)]
    x = jnp.ones((rows, d), dtype)

    @jax.jit
    def chain(ws, x):
        for w in ws:  # as the decode step: float32 accumulation, rounded to the compute dtype
            x = jnp.dot(x, w, preferred_element_type=jnp.float32)[:, :d].astype(dtype)
        return x

    chain(ws, x).block_until_ready()
    best = min(_timed(lambda: chain(ws, x).block_until_ready())[0] for _ in range(5))
    return 2 * rows * d * 2 * f * layers / best / 1e9


def roofline(cfg, batch: int, prompt_len: int, new_tokens: int, bandwidth: float, peak: float,
             decode_rate: float | None = None) -> tuple[float, str]:
    """(tok/s bound, what limits the decode) for prefill + new_tokens - 1 decode steps.

    A decode step reads the layer weights in the compute dtype, the logits head (in the compute
    dtype when stored so, else float32) and the KV cache at its average length. Its FLOPs run at
    `decode_rate` GFLOP/s (default: the large-matmul `peak`, as the prefill's)."""
    item = jnp.dtype(cfg.dtype).itemsize
    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    layer_params = shapes.layer_params(cfg)
    attn = shapes.attention_flops_per_token(cfg, 1)  # FLOPs per (query, key) pair
    head_item = item if cfg.param_dtype == cfg.dtype else 4
    kv = 2 * layers * batch * (prompt_len + new_tokens / 2) * cfg.num_kv_heads * cfg.head_dim * item
    step_bytes = layer_params * item + v * d * head_item + kv
    step_flops = 2 * batch * (layer_params + v * d) + batch * attn * (prompt_len + new_tokens / 2)
    prefill_flops = 2 * batch * prompt_len * layer_params + batch * attn * prompt_len ** 2 / 2 + 2 * batch * v * d
    mem, comp = step_bytes / (bandwidth * 1e9), step_flops / ((decode_rate or peak) * 1e9)
    seconds = prefill_flops / (peak * 1e9) + (new_tokens - 1) * max(mem, comp)
    return batch * new_tokens / seconds, "memory" if mem > comp else "compute"


def bench_ours(params, cfg, prompts: np.ndarray, new_tokens: int, greedy: bool, repeats: int):
    """(compile seconds, best (wall, cpu) of the timed runs)."""
    from reft_jax.rollout import sampler as sampling

    config = sampling.SampleConfig(max_new_tokens=new_tokens, greedy=greedy)  # no EOS: full length
    mask = np.ones(prompts.shape, bool)

    def run(seed):
        return lambda: sampling.sample(params, prompts, mask, jax.random.key(seed), cfg, config).tokens.block_until_ready()

    first = _timed(run(0))[0]
    times = [_timed(run(i + 1)) for i in range(repeats)]
    best = min(times)
    return first - best[0], best


def bench_hf(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
    import torch

    device = next(model.parameters()).device
    ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
    mask = torch.ones_like(ids)

    def generate(n: int, width: int | None = None):
        out = model.generate(ids[:, :width], attention_mask=mask[:, :width], do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        generate(2, 8)
        return _timed(lambda: generate(new_tokens))


def load_hf_gguf(path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype).eval()
    return model


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def load_models(args, dtype: str):
    """(model config, params, transformers model or None) of `args.shape` in `dtype`."""
    if args.gguf:
        from reft_jax.model.io import load_model, smollm2_gguf_path

        path = smollm2_gguf_path()
        cfg, params, _ = load_model(path, dtype=dtype, param_dtype=dtype, with_tokenizer=False)
        return cfg, params, None if args.no_hf else load_hf_gguf(path, dtype)
    cfg = shapes.model_config(args.shape, dtype=dtype, param_dtype=dtype)
    hf = None if args.no_hf else shapes.hf_model(cfg, dtype, shapes.torch_device())
    return cfg, shapes.random_params(cfg), hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=list(shapes.SHAPES), help="random weights of this shape")
    parser.add_argument("--gguf", action="store_true", help="the real SmolLM2-135M weights (shape smollm2-135m)")
    parser.add_argument("--quick", action="store_true", help="smoke run: float32, batch 8, 16 new tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of ours after the compiling one (best kept)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--one-core", action="store_true", help="pin the process to one core (single-threaded)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.dtypes, args.new_tokens, args.repeats = [8], ["float32"], 16, 1
    if args.gguf and args.shape != "smollm2-135m":
        parser.error("--gguf holds the SmolLM2-135M weights: use --shape smollm2-135m")
    for dtype in args.dtypes:
        if dtype not in shapes.DTYPES:
            parser.error(f"--dtypes: {dtype!r} is not one of {', '.join(shapes.DTYPES)}")

    if not args.no_hf:
        import torch

        if args.one_core:
            torch.set_num_threads(1)
    dev = jax.devices()[0]
    threads = f"; torch {torch.__version__} on {shapes.torch_device()}, {torch.get_num_threads()} threads" \
        if not args.no_hf else ""
    print(f"{shapes.device_line()}; host {platform.machine()}{threads}")
    print(f"load average at start: {_load()} (other processes skew wall-clock timings)")
    bw_dev, bw_host = measure_bandwidth()
    # on a CPU the device memory is host memory: the better of the two copies is what is achievable
    bandwidth = max(bw_dev, bw_host) if dev.platform == "cpu" else bw_dev
    print(f"memory bandwidth (copy, read+write): {bw_dev:.1f} GB/s via JAX on {dev.platform}, "
          f"{bw_host:.1f} GB/s via NumPy; bound uses {bandwidth:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for dtype in args.dtypes:
        peak = measure_matmul(dtype)
        print(f"{dtype} matmul 2048^3: {peak:.0f} GFLOP/s")
        cfg, params, hf = load_models(args, dtype)
        for batch in args.batches:
            prompts = rng.integers(100, cfg.vocab_size - 100, (batch, args.prompt_len)).astype(np.int32)
            tokens = batch * args.new_tokens
            load = _load()
            compile_g, ours_g = bench_ours(params, cfg, prompts, args.new_tokens, True, args.repeats)
            _, ours_s = bench_ours(params, cfg, prompts, args.new_tokens, False, args.repeats)
            hf_t = None if hf is None else bench_hf(hf, prompts, args.new_tokens)
            bound, limit = roofline(cfg, batch, args.prompt_len, args.new_tokens, bandwidth, peak)
            # the same bound with the decode's FLOPs at the rate XLA's dots reach at its shape
            rate = measure_decode_matmul(dtype, batch, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers)
            dot_bound, _ = roofline(cfg, batch, args.prompt_len, args.new_tokens, bandwidth, peak, rate)
            row = dict(shape=args.shape, dtype=dtype, batch=batch, g=tokens / ours_g[0], g_cpu=tokens / ours_g[1],
                       s=tokens / ours_s[0], hf=None if hf_t is None else tokens / hf_t[0],
                       hf_cpu=None if hf_t is None else tokens / hf_t[1], bound=bound, limit=limit,
                       rate=rate, dot_bound=dot_bound, compile=compile_g, load=f"{load}-{_load()}")
            rows.append(row)
            print(f"  {dtype} batch {batch}: ours greedy {row['g']:.0f} tok/s ({row['g_cpu']:.0f}/CPU-s), "
                  f"sampling {row['s']:.0f} tok/s"
                  + ("" if hf_t is None else f"; transformers {row['hf']:.0f} tok/s ({row['hf_cpu']:.0f}/CPU-s)")
                  + f"; roofline {bound:.0f} tok/s ({limit}-bound decode); XLA dots at {batch} rows "
                  f"{rate:.0f} GFLOP/s, bound at that rate {dot_bound:.0f} tok/s; load {row['load']}"
                  + f"\n  {dtype} batch {batch}: {row['g'] / bound:.0%} of the roofline"
                  + ("" if hf_t is None else f", {row['g'] / row['hf']:.2f}x transformers generate"),
                  flush=True)
        del params, hf
    print(f"\n{args.shape} ({'GGUF' if args.gguf else 'random'} weights), {args.prompt_len}-token prompts, {args.new_tokens} new tokens, prefill included; "
          f"tok/s per wall second (per CPU second)")
    print(f"{'dtype':9} {'batch':>5} {'ours greedy':>14} {'ours sample':>11} {'HF greedy':>12} {'x wall':>6} "
          f"{'x CPU':>6} {'roofline':>8} {'limit':>7} {'of bound':>8} {'dot bound':>9} {'of it':>6} {'compile':>7} {'load':>9}")
    for r in rows:
        hf_col = f"{r['hf']:5.0f} ({r['hf_cpu']:4.0f})" if r["hf"] is not None else f"{'-':>12}"
        ratio = f"{r['g'] / r['hf']:6.2f} {r['g_cpu'] / r['hf_cpu']:6.2f}" if r["hf"] is not None else f"{'-':>6} {'-':>6}"
        print(f"{r['dtype']:9} {r['batch']:5d} {r['g']:6.0f} ({r['g_cpu']:5.0f}) {r['s']:11.0f} {hf_col} {ratio} "
              f"{r['bound']:8.0f} {r['limit']:>7} {r['g'] / r['bound']:8.0%} {r['dot_bound']:9.0f} {r['g'] / r['dot_bound']:6.0%} {r['compile']:6.1f}s "
              f"{r['load']:>9}")
    print(f"load average at end: {_load()}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"device": shapes.device_line(), "bandwidth_gbs": bandwidth,
                                                       "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
