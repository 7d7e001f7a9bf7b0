"""reft-jax: ReFT (Reasoning with Reinforced Fine-Tuning) in JAX/Flax."""
from setuptools import find_packages, setup

# Version ranges that cover the stacks known to work (../shared/docs/environment.md):
#   CPU CI:    jax 0.10.2, flax 0.12.8,  orbax-checkpoint 0.12.8, transformers 5.24.0
#   H200 GPU:  jax 0.11.2, flax 0.12.10, orbax-checkpoint 0.12.4, transformers 5.17.0
# Plain `jax` here, so an accelerator host keeps its own backend; pick one with an extra
# (`.[cpu]`, `.[cuda12]`, `.[cuda13]`, `.[tpu]`). jaxlib comes with jax (jax requires the
# matching one). The exact CPU set CI installs is locked in constraints.txt (scripts/setup.sh).
RUNTIME = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.4,<0.13",
    # GGUF tokenizer conversion uses transformers' internal integrations.gguf: keep it narrow.
    "transformers>=5.17,<5.25",
    "tokenizers>=0.23.1,<0.24",  # what transformers 5.17-5.24 require
    "safetensors>=0.8.0,<0.9",
    "gguf>=0.19.0,<0.20",
    "numpy>=2.4,<3",
    "jinja2>=3.1,<4",  # apply_chat_template
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "sympy>=1.12",
]

setup(
    name="reft-jax",
    version="0.1.0",
    description="ReFT: Reasoning with Reinforced Fine-Tuning, in JAX/Flax",
    packages=find_packages(include=["reft_jax", "reft_jax.*"]),
    python_requires=">=3.11",  # jax 0.10.2, flax, orbax-checkpoint and numpy 2.4 need 3.11
    install_requires=RUNTIME,
    extras_require={
        # JAX backends: jax's own extras, which bring the matching jaxlib / plugin / libtpu.
        "cpu": ["jax[cpu]"],
        "cuda12": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
        # Test-only reference implementations. torch never appears at run time.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch>=2.13,<2.14",
            "accelerate>=1.0",
            "pebble>=5.0",
        ],
        "tfds": ["tensorflow-datasets>=4.9.10,<4.10", "array-record"],
    },
    entry_points={"console_scripts": ["reft=reft_jax.cli:main"]},
)
