"""What the benchmarks share: the named random-weight model shapes, their FLOP and byte counts,
what the device can do (matmul peak, copy bandwidth, measured in the same run), and a
transformers twin of a shape for the PyTorch baselines.

    python experiments/benchmarks/shapes.py      # the table of shapes, with parameter counts

Weights are random: throughput does not depend on their values, and no checkpoint has to travel
to an accelerator machine. The shapes follow the models' published `config.json`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

SHAPES: dict[str, dict[str, Any]] = {
    # a few-second smoke size (tests, CPU)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                 max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    # meta-llama/Llama-3.2-1B
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # codellama/CodeLlama-7b-hf (the paper's model)
    "codellama-7b": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                         num_kv_heads=32, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, max_position_embeddings=16384),
}
DTYPES = ("bfloat16", "float32")


def model_config(shape: str, dtype: str = "float32", param_dtype: str = "float32", **overrides: Any):
    """The `ModelConfig` of a named shape (`dtype`: compute, `param_dtype`: storage)."""
    from reft_jax.model.config import ModelConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return ModelConfig(**{**SHAPES[shape], "dtype": dtype, "param_dtype": param_dtype, **overrides})


def random_params(config, seed: int = 0):
    """Random params of `config` (value head included), made on the default device."""
    import jax

    from reft_jax.model import llama

    return jax.jit(lambda key: llama.init_params(config, key))(jax.random.key(seed))


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------
def layer_params(config) -> int:
    """Parameters of the decoder layers (projections and norms), the embedding and head left out."""
    c = config
    return c.num_params(include_value_head=False) - c.vocab_size * c.hidden_size * (
        1 if c.tie_word_embeddings else 2) - c.hidden_size


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: the layers' projections and the LM head
    (the embedding lookup and the norms are no matmul; a tied head counts once)."""
    c = config
    return layer_params(c) - 2 * c.num_layers * c.hidden_size + c.vocab_size * c.hidden_size


def attention_flops_per_token(config, context: float) -> float:
    """Forward FLOPs of the attention scores and their weighted sum for one query over `context`
    keys (2 x 2 x head_dim per key, per head, per layer)."""
    return 4 * config.num_layers * config.num_heads * config.head_dim * context


def train_flops_per_token(config, seq_len: int, attention: bool = False) -> float:
    """Model FLOPs of a training step per token: 6 x matmul params (forward + backward), plus with
    `attention` the causal attention (average context seq_len / 2), as in PaLM's MFU."""
    return 6 * matmul_params(config) + (3 * attention_flops_per_token(config, seq_len / 2) if attention else 0)


def gib(n: float) -> float:
    return n / 2 ** 30


def flops_str(rate: float) -> str:
    """FLOP/s in the unit that reads well (a CPU's GFLOP/s, a GPU's TFLOP/s)."""
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


# ----------------------------------------------------------------------------------------------
# The device
# ----------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def on_accelerator() -> bool:
    import jax

    return jax.devices()[0].platform != "cpu"


def device_line() -> str:
    import jax

    dev = jax.devices()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}; jax {jax.__version__}; "
            f"{cpus} of {os.cpu_count()} CPUs usable")


def matmul_peak(dtype: str, n: int | None = None, reps: int = 5) -> float:
    """Sustained FLOP/s of an n x n x n matmul in `dtype` on the default device (best of `reps`;
    n: 8192 on an accelerator, 2048 on a CPU). The MFU denominator: what this backend reaches,
    measured in the same run (654 TFLOP/s bf16 on one H200 at 8192)."""
    import jax
    import jax.numpy as jnp

    n = n or (8192 if on_accelerator() else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    return 2 * n ** 3 / min(timed(lambda: mm(a, b).block_until_ready())[0] for _ in range(reps))


def copy_bandwidth(nbytes: int = 1 << 29) -> tuple[float, float]:
    """(JAX default device, NumPy host) copy bandwidth in bytes/s, read + write counted (3.4 TB/s
    on one H200). The JAX copy is donated, so it rewrites one buffer instead of faulting in
    fresh pages."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = nbytes // 4
    state = {"x": jnp.arange(n, dtype=jnp.float32)}
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)

    def once():
        state["x"] = scale(state["x"])
        state["x"].block_until_ready()

    once()
    dev = 2 * nbytes / min(timed(once)[0] for _ in range(5))
    h = np.arange(n, dtype=np.float32)
    out = np.empty_like(h)
    host = 2 * nbytes / min(timed(lambda: np.copyto(out, h))[0] for _ in range(5))
    return dev, host


# ----------------------------------------------------------------------------------------------
# The PyTorch twin
# ----------------------------------------------------------------------------------------------
def torch_device() -> str:
    """Where the PyTorch baseline runs: the GPU when JAX runs on one and torch sees it, else the CPU."""
    import torch

    return "cuda" if on_accelerator() and torch.cuda.is_available() else "cpu"


def hf_model(config, dtype: str, device: str, seed: int = 0):
    """A transformers `LlamaForCausalLM` of `config`'s shape with random weights, in `dtype`, on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    try:  # made in `dtype` on `device` directly: a 7B model never exists in float32 on the host
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**hf))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def main() -> None:
    print(f"{'shape':14} {'layers':>6} {'hidden':>6} {'ffn':>6} {'heads':>5} {'kv':>3} {'hd':>4} {'vocab':>7} "
          f"{'tied':>5} {'params':>8} {'matmul':>8}")
    for name in SHAPES:
        c = model_config(name)
        print(f"{name:14} {c.num_layers:6d} {c.hidden_size:6d} {c.intermediate_size:6d} {c.num_heads:5d} "
              f"{c.num_kv_heads:3d} {c.head_dim:4d} {c.vocab_size:7d} {str(c.tie_word_embeddings):>5} "
              f"{c.num_params(include_value_head=False) / 1e6:7.1f}M {matmul_params(c) / 1e6:7.1f}M")


if __name__ == "__main__":
    main()

