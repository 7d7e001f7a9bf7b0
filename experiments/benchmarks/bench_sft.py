"""SFT step throughput and MFU on SmolLM2-135M: our jitted step against a transformers/torch one.

Both do one full fine-tuning step (forward, backward, global-norm clip 1.0, AdamW) on the same
batch of 8 x 256 tokens in float32, from the same weights (ours exported to an HF directory).
Their timed steps alternate, so a shared, busy machine slows both alike and the ratio holds.
Model FLOPs per step are 6 * N * tokens (N counts every matmul parameter, the tied LM head
included; attention score FLOPs are left out, as in the usual MFU convention); the peak is the
float32 matmul throughput this script measures on the same machine, so MFU is "fraction of the
matmul speed this backend actually reaches".

    .venv/bin/python experiments/benchmarks/bench_sft.py [--batch 8] [--seq 256] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Sustained float32 matmul FLOP/s of the default JAX device (best of `reps`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, no padding, every position trained (a pure throughput batch)."""
    rng = np.random.default_rng(seed)
    weights = np.ones((batch, seq), np.float32)
    weights[:, -1] = 0.0  # the last position predicts nothing
    return {"tokens": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "attention_mask": np.ones((batch, seq), bool), "loss_weights": weights}


def jax_step(config, params, batch: dict) -> Callable[[], float]:
    """A closure running one jitted SFT step of ours (state donated and carried along)."""
    from reft_jax import parallel
    from reft_jax.train import sharded
    from reft_jax.train.sft_step import make_sft_step
    from reft_jax.train.state import OptimConfig, make_optimizer

    mesh = parallel.single_device_mesh()
    tx = make_optimizer(OptimConfig(lr=1e-5, schedule="constant"), total_steps=100)
    box = {"state": sharded.create_state(params, tx, jax.random.key(0), mesh)}
    placed = parallel.shard_batch(batch, mesh)
    step = sharded.jit_step(make_sft_step(config, tx), box["state"], placed, mesh)

    def run() -> float:
        box["state"], m = step(box["state"], placed)
        return float(m["loss"])  # blocks until the step is done

    return run


def torch_step(hf_dir: str, batch: dict) -> Callable[[], float]:
    """A closure running one transformers + torch AdamW step (clip 1.0, as ReFT's DeepSpeed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.from_numpy(batch["tokens"]).long()
    mask = torch.from_numpy(batch["attention_mask"]).long()

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return run


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = fn()
    return time.perf_counter() - t0, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    from reft_jax.model.io import load_model, save_hf, smollm2_gguf_path

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs visible")
    config, params, tokenizer = load_model(smollm2_gguf_path(), dtype="float32", param_dtype="float32")
    n_matmul = config.num_params(include_value_head=False)
    tokens = args.batch * args.seq
    batch = make_batch(args.batch, args.seq, config.vocab_size)
    peak = matmul_peak()
    print(f"SmolLM2-135M: {n_matmul / 1e6:.1f}M params (tied head counted once), batch {args.batch} x {args.seq} "
          f"= {tokens} tokens, float32")
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s (2048^3 jnp.dot)")

    flops = 6 * n_matmul * tokens
    steps = {"reft-jax": jax_step(config, params, batch)}
    if not args.skip_torch:
        import torch

        with tempfile.TemporaryDirectory() as hf_dir:
            save_hf(hf_dir, config, params, tokenizer)
            steps["torch"] = torch_step(hf_dir, batch)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    del params
    for name, fn in steps.items():  # warm-up: compile / allocate
        seconds, loss = timed(fn)
        print(f"{name:9s} first step {seconds:.1f} s (compile / allocation included), loss {loss:.3f}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so a busy machine slows both alike
        for name, fn in steps.items():
            times[name].append(timed(fn)[0])
    rate = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        rate[name] = tokens / sec
        print(f"{name:9s} {sec:.3f} s/step (median of {len(ts)}: {', '.join(f'{t:.2f}' for t in ts)}), "
              f"{rate[name]:,.0f} tokens/s, {flops / sec / 1e9:.1f} GFLOP/s, MFU {flops / sec / peak:.1%}")
    if "torch" in rate:
        print(f"ratio reft-jax / torch tokens/s: {rate['reft-jax'] / rate['torch']:.2f}x")


if __name__ == "__main__":
    main()
