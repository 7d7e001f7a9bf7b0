"""Seconds per ReFT PPO step and its breakdown on SmolLM2-135M (SVAMP P-CoT, real sandbox).

One step = rollout (sampling 32 questions x 1 sample, pure sampling, <= 700 tokens in all) ->
reward (decode, run the programs in the sandbox) -> score pass (policy + reference forwards) ->
2 PPO epochs of one update each, exactly as `reft ppo` runs it (this calls `run_ppo`). The
phases come from the loop's own timer (`train/time/*` in metrics.jsonl):

  rollout      sampling until the tokens are on the host
  reward       host: decode + extract / execute (the score pass runs on the device meanwhile)
  score_wait   what was left of the score pass after the host finished the rewards
  update       GAE + whitening + the updates, until their metrics are on the host
  compile      XLA compilation inside the step (from jax.monitoring), counted in the phases

`--sync` blocks after every phase instead (no overlap): `score` is then the full score pass,
so `sync score + sync reward - (async reward + score_wait)` is what the overlap saves.
The first step compiles every program; later steps compile again only for new shape buckets.

    .venv/bin/python experiments/benchmarks/bench_ppo.py [--questions 32] [--steps 3]
        [--max-new-tokens N] [--sync] [--dataset svamp --engine python]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax

PHASES = ("rollout", "reward", "score_dispatch", "score_wait", "score", "update", "prepare_next", "prefixes")


class CompileClock:
    """Seconds spent compiling, from JAX's monitoring events (backend compile + tracing)."""

    def __init__(self) -> None:
        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: object) -> None:
        if event.endswith("backend_compile_duration"):
            self.total += duration


def run(args: argparse.Namespace) -> dict:
    from reft_jax import config as config_lib
    from reft_jax.metrics import read_metrics
    from reft_jax.model.io import smollm2_gguf_path
    from reft_jax.train.ppo import PPOConfig, run_ppo

    run_dir = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="bench_ppo_"))
    overrides = [
        f"run_dir={run_dir}", f"model.path={args.model or smollm2_gguf_path()}", "model.step=latest",
        f"data.dataset={args.dataset}", f"data.engine={args.engine}",
        f"data.max_train_examples={args.questions * (args.steps + 1)}", "data.max_test_examples=0",
        f"batch_questions={args.questions}", f"max_total_len={args.max_total_len}", "epochs=1",
        f"max_steps={args.steps}", f"profile_sync={str(args.sync).lower()}", "mesh.fsdp=-1",
        f"optim.compute_dtype={args.dtype}", f"score_microbatches={args.score_microbatches}",
        f"optim.grad_accum={args.grad_accum}", "optim.lr=3e-7",
    ]
    if args.max_new_tokens:
        overrides.append(f"max_new_tokens={args.max_new_tokens}")
    cfg = config_lib.load_config(PPOConfig, overrides=overrides + list(args.overrides))
    clock = CompileClock()
    compile_at = {}

    def after(step: int, state) -> None:
        compile_at[step] = clock.total

    start = time.perf_counter()
    run_ppo(cfg, _after_step=after)
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    steps, prev = [], 0.0
    for r in rows:
        compiled = compile_at.get(r["step"], prev) - prev
        prev = compile_at.get(r["step"], prev)
        phases = {p: r[f"train/time/{p}"] for p in PHASES if f"train/time/{p}" in r}
        steps.append({"step": r["step"], "seconds": cfg.rows / r["train/sequences_per_s"], **phases,
                      "compile": compiled, "response_length": r["train/response_length"],
                      "response_length_max": r["train/response_length_max"], "score_mean": r["train/score_mean"],
                      "exec": {s: r[f"train/exec_{s}"] for s in ("ok", "error", "timeout", "rejected")}})
    later = steps[1:] or steps
    return {"device": str(jax.devices()[0].platform), "devices": jax.device_count(), "questions": args.questions,
            "max_total_len": args.max_total_len, "max_new_tokens": args.max_new_tokens, "sync": args.sync,
            "dtype": args.dtype, "wall_seconds": wall, "steps": steps,
            "steady_seconds_per_step": statistics.mean(s["seconds"] - s["compile"] for s in later)}


def print_table(result: dict) -> None:
    cols = ["step", "seconds", "compile", "rollout", "reward", "score_wait" if not result["sync"] else "score",
            "update", "response_length"]
    print(f"device {result['device']} x{result['devices']}, {result['questions']} questions, "
          f"max_total_len {result['max_total_len']}, max_new_tokens {result['max_new_tokens']}, "
          f"{'sync (no overlap)' if result['sync'] else 'overlapped'}, compute {result['dtype']}")
    print("  ".join(f"{c:>15}" for c in cols))
    for s in result["steps"]:
        print("  ".join(f"{s.get(c, float('nan')):>15.2f}" if c != "step" else f"{s[c]:>15d}" for c in cols)
              + f"   exec {s['exec']}, mean reward {s['score_mean']:.3f}")
    print(f"steady state (compile excluded, steps after the first): "
          f"{result['steady_seconds_per_step']:.1f} s/step; wall {result['wall_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-total-len", type=int, default=700)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--dataset", default="svamp")
    parser.add_argument("--engine", default="python")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--score-microbatches", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--sync", action="store_true", help="block after every phase (exact phase times)")
    parser.add_argument("--model", default=None, help="GGUF / HF dir / reft run dir (default SmolLM2-135M)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="extra PPOConfig overrides key=value")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
