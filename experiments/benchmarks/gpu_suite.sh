#!/usr/bin/env bash
# The accelerator benchmarks of issue 14 in one call (about 9 minutes on one H200 in all; random
# weights, so no checkpoint or data file has to travel). Each benchmark runs under its own
# `timeout`; its output goes to $OUT/bench_<name>.txt and its result to $OUT/bench_<name>.json
# (8 files: what the device tool brings back). The targets (issue 14, "Must show"):
#   sampler, SmolLM2-135M shape, batch 256, bf16           >= 40% of the bandwidth roofline
#   SFT step, Llama-3.2-1B shape, 16 x 1024, bf16 compute   fits, MFU >= 35%
#   PPO, SmolLM2-135M shape, 256 questions x 700 tokens     fits, steady <= 4 s/step, <= 60 s compiling
#   sampler, CodeLlama-7B shape, batch 64, bf16             >= 80% of the bandwidth roofline
# Each prints its ratio against a baseline timed in the same run (transformers on the same GPU).
#
# The machine lacks `gguf` and `tensorboardX` (the PPO run imports both). Once, here:
#   echo /.whl/ >> .git/info/exclude   # (.gitignore already has /.whl/)
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl gguf==0.19.0 tensorboardX==2.6.5
# then one `run` with carry [".whl"], timeout_s 600:
#   bash experiments/benchmarks/gpu_suite.sh
# Phases can be picked: `bash experiments/benchmarks/gpu_suite.sh sampler_smollm2 ppo`.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
B=experiments/benchmarks

phase() {  # phase NAME SECONDS SCRIPT ARGS...: run it under its timeout, tee'd, its exit status noted
    local name=$1 limit=$2
    shift 2
    case " ${PHASES:-} " in "  ") ;; *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (timeout ${limit}s): $*" | tee "$OUT/bench_$name.txt"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" "$@" --json "$OUT/bench_$name.json" 2>&1 | tee -a "$OUT/bench_$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')" \
        | tee -a "$OUT/bench_$name.txt"
}
PHASES="$*"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; } \
    | sed 's/^/gpu: /'
"$PY" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, \
'| transformers', transformers.__version__)" 2>&1 | grep -v Warning

phase sampler_smollm2 120 $B/bench_sampler.py --shape smollm2-135m --dtypes bfloat16 --batches 64 256 \
    --prompt-len 128 --new-tokens 256 --repeats 2
phase sft_llama1b 150 $B/bench_sft.py --shape llama-1b --dtype bfloat16 --batch 16 --seq 1024 --steps 3
phase ppo 180 $B/bench_ppo.py --shape smollm2-135m --questions 256 --total-len 700 --dtype bfloat16 \
    --dataset synthetic --steps 4 --run-dir /tmp/bench_ppo_run
phase sampler_codellama7b 130 $B/bench_sampler.py --shape codellama-7b --dtypes bfloat16 --batches 64 \
    --prompt-len 128 --new-tokens 256
echo "=== done; outputs in $OUT"
