"""SFT step throughput and MFU on a named model shape: our jitted step against a transformers/torch one.

Both do one full fine-tuning step (forward, backward, global-norm clip 1.0, AdamW) on the same
random batch of `--batch` x `--seq` tokens, float32 master params, compute in `--dtype` (ours:
params cast for the forward; torch: autocast), from random weights of the named shape
(`shapes.py`: tiny, smollm2-135m, llama-1b, codellama-7b; `--gguf` loads the real SmolLM2-135M
weights instead). The torch step runs on the same device as JAX (the GPU when there is one);
the timed steps alternate, so a shared, busy machine slows both alike and the ratio holds.

MFU: model FLOPs per step are 6 x N x tokens (N counts every matmul parameter, the LM head once,
not the embedding lookup; attention score FLOPs left out, the usual convention; "with attention"
adds the causal attention, as PaLM's MFU) over the peak of a large matmul in the compute dtype
that this script measures on the same device (8192^3 on an accelerator: 654 TFLOP/s bf16 on one
H200; 2048^3 on a CPU), so MFU is "fraction of the matmul speed this backend actually reaches".
Before compiling, the memory plan of the step (`reft_jax.memory.plan_run`) is printed against
the device's memory; `--grad-accum auto` / `--remat auto` let the planner pick.

    .venv/bin/python experiments/benchmarks/bench_sft.py [--shape smollm2-135m] [--dtype float32]
        [--batch 8] [--seq 256] [--steps 3] [--grad-accum 1] [--remat none] [--skip-torch]
    python experiments/benchmarks/bench_sft.py --shape llama-1b --dtype bfloat16 --batch 16 --seq 1024  # H200
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

# JAX takes 75% of a GPU at start unless told otherwise; the torch baseline shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import shapes  # noqa: E402  (this folder is on sys.path when the script runs)


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, no padding, every position trained (a pure throughput batch)."""
    rng = np.random.default_rng(seed)
    weights = np.ones((batch, seq), np.float32)
    weights[:, -1] = 0.0  # the last position predicts nothing
    return {"tokens": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "attention_mask": np.ones((batch, seq), bool), "loss_weights": weights}


def jax_step(config, params, batch: dict, grad_accum: int, compute_dtype: str,
             chunk: int | None) -> Callable[[], float]:
    """A closure running one jitted SFT step of ours (state donated and carried along)."""
    from reft_jax import parallel
    from reft_jax.train import sharded
    from reft_jax.train.sft_step import make_sft_step
    from reft_jax.train.state import OptimConfig, make_optimizer

    mesh = parallel.single_device_mesh()
    tx = make_optimizer(OptimConfig(lr=1e-5, schedule="constant"), total_steps=100)
    box = {"state": sharded.create_state(params, tx, jax.random.key(0), mesh)}
    placed = parallel.shard_batch(batch, mesh)
    step = sharded.jit_step(make_sft_step(config, tx, grad_accum, compute_dtype, chunk), box["state"], placed, mesh)

    def run() -> float:
        box["state"], m = step(box["state"], placed)
        return float(m["loss"])  # blocks until the step is done

    return run


def torch_step(model, batch: dict, dtype: str, device: str) -> Callable[[], float]:
    """A closure running one transformers + torch AdamW step (clip 1.0, as ReFT's DeepSpeed);
    float32 master weights, the forward and backward under autocast when `dtype` is bfloat16."""
    import contextlib

    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.from_numpy(batch["tokens"]).long().to(device)
    mask = torch.from_numpy(batch["attention_mask"]).long().to(device)

    def autocast():
        if dtype == "bfloat16":
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())  # synchronises

    return run


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = fn()
    return time.perf_counter() - t0, loss


def plan(config, batch: int, seq: int, grad_accum: str, remat: str, dtype: str, chunk: int | None):
    """(grad_accum, remat, plan) with any "auto" resolved by the planner, and the plan printed."""
    from reft_jax import memory, parallel

    mesh = parallel.single_device_mesh()
    device = memory.device_memory_bytes()
    choice = memory.resolve_auto("sft", config, mesh, batch=batch, seq_len=seq, grad_accum=grad_accum,
                                 remat=remat, device_bytes=device, compute_dtype=dtype, logprob_chunk=chunk)
    print(memory.format_plan(choice.plan, device), flush=True)
    return choice.grad_accum, choice.remat, choice.plan


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=list(shapes.SHAPES))
    parser.add_argument("--dtype", default="float32", choices=shapes.DTYPES, help="compute dtype (params float32)")
    parser.add_argument("--gguf", action="store_true", help="the real SmolLM2-135M weights (shape smollm2-135m)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    parser.add_argument("--grad-accum", default="1", help="micro-batches per step, or auto")
    parser.add_argument("--remat", default="none", help="none | layer | dots_saveable | auto")
    parser.add_argument("--chunk", type=int, default=None, help="log-prob chunk (default the library's; 0: none)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.gguf and args.shape != "smollm2-135m":
        parser.error("--gguf holds the SmolLM2-135M weights: use --shape smollm2-135m")

    from reft_jax.model import logprobs

    chunk = logprobs.DEFAULT_CHUNK if args.chunk is None else (args.chunk or None)
    print(shapes.device_line(), flush=True)
    if args.gguf:
        from reft_jax.model.io import load_model, smollm2_gguf_path

        config, params, _ = load_model(smollm2_gguf_path(), dtype=args.dtype, param_dtype="float32",
                                       with_tokenizer=False)
    else:
        config = shapes.model_config(args.shape, dtype=args.dtype, param_dtype="float32")
    accum = args.grad_accum if args.grad_accum == "auto" else int(args.grad_accum)
    accum, remat, mem_plan = plan(config, args.batch, args.seq, accum, args.remat, args.dtype, chunk)
    config = dataclasses.replace(config, remat=remat)
    if not args.gguf:
        params = shapes.random_params(config)
    tokens = args.batch * args.seq
    batch = make_batch(args.batch, args.seq, config.vocab_size)
    peak = shapes.matmul_peak(args.dtype)
    weights = "SmolLM2-135M GGUF weights" if args.gguf else "random weights"
    print(f"{args.shape} ({weights}): {shapes.matmul_params(config) / 1e6:.1f}M matmul params, batch {args.batch} x "
          f"{args.seq} = {tokens} tokens, float32 params, {args.dtype} compute, grad_accum {accum}, remat {remat}, "
          f"log-prob chunk {chunk}")
    print(f"measured {args.dtype} matmul peak: {shapes.flops_str(peak)}", flush=True)

    flops = shapes.train_flops_per_token(config, args.seq) * tokens
    flops_attn = shapes.train_flops_per_token(config, args.seq, attention=True) * tokens
    steps = {"reft-jax": jax_step(config, params, batch, accum, args.dtype, chunk)}
    del params
    result = {"shape": args.shape, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "grad_accum": accum,
              "remat": remat, "chunk": chunk, "device": shapes.device_line(), "peak_flops": peak,
              "plan_gib": shapes.gib(mem_plan.total), "fits": True}
    if not args.skip_torch:
        import torch

        device = shapes.torch_device()
        steps["torch"] = torch_step(shapes.hf_model(config, "float32", device), batch, args.dtype, device)
        print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")
    for name, fn in list(steps.items()):  # warm-up: compile / allocate
        try:
            seconds, loss = timed(fn)
        except Exception as e:  # out of memory above all: say so in one line, keep the other side
            print(f"{name:9s} FAILED: {_first_line(e)}", flush=True)
            del steps[name]
            result["fits" if name == "reft-jax" else "torch_fits"] = False
            continue
        print(f"{name:9s} first step {seconds:.1f} s (compile / allocation included), loss {loss:.3f}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so a busy machine slows both alike
        for name, fn in steps.items():
            times[name].append(timed(fn)[0])
    rate = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        rate[name] = tokens / sec
        result[name] = {"seconds_per_step": sec, "tokens_per_s": rate[name], "mfu": flops / sec / peak,
                        "mfu_with_attention": flops_attn / sec / peak}
        print(f"{name:9s} {sec:.3f} s/step (median of {len(ts)}: {', '.join(f'{t:.2f}' for t in ts)}), "
              f"{rate[name]:,.0f} tokens/s, {shapes.flops_str(flops / sec)}, MFU {flops / sec / peak:.1%} "
              f"({flops_attn / sec / peak:.1%} with attention)")
    if "torch" in rate and "reft-jax" in rate:
        result["ratio"] = rate["reft-jax"] / rate["torch"]
        print(f"ratio reft-jax / torch tokens/s: {result['ratio']:.2f}x")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
