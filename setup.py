"""reft-jax: ReFT (Reasoning with Reinforced Fine-Tuning) in JAX/Flax."""
from setuptools import find_packages, setup

# One pinned set, measured to install together (see docs in ../shared/docs/environment.md).
RUNTIME = [
    "jax[cpu]==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers==5.24.0",  # pinned: GGUF tokenizer conversion uses an internal module
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "numpy==2.4.6",
    "jinja2==3.1.6",
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
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        # Test-only reference implementations. torch never appears at run time.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "accelerate>=1.0",
            "pebble>=5.0",
        ],
        "tfds": ["tensorflow-datasets==4.9.10", "array-record"],
    },
    entry_points={"console_scripts": ["reft=reft_jax.cli:main"]},
)
