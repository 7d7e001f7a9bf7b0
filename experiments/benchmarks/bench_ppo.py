"""Seconds per ReFT PPO step, its breakdown and its compile time (SVAMP P-CoT, real sandbox).

One step = rollout (sampling 32 questions x 1 sample, pure sampling, <= 700 tokens in all) ->
reward (decode, run the programs in the sandbox) -> score pass (policy + reference forwards) ->
2 PPO epochs of one update each, exactly as `reft ppo` runs it (this calls `run_ppo`). The
phases come from the loop's own timer (`train/time/*` in metrics.jsonl):

  rollout      sampling until the tokens are on the host
  reward       host: decode + extract / execute (the score pass runs on the device meanwhile)
  score_wait   what was left of the score pass after the host finished the rewards
  update       GAE + whitening + the updates, until their metrics are on the host
  compile      XLA compilation inside the step (`train/compile_seconds`), counted in the phases

`--sync` blocks after every phase instead (no overlap): `score` is then the full score pass,
so `sync score + sync reward - (async reward + score_wait)` is what the overlap saves.
The first step compiles every program; later steps compile again only for new shape buckets
(`train/prompt_width`, `train/seq_width` say which). The steady state is the mean step time
after the first with its compile seconds taken out; compile seconds are reported apart, per
step and for the whole run (`reft_jax.train.loop.CompileLog`: per function too). The memory
plan the run ran under (`reft_jax.memory.plan_run`, the same arguments as `reft ppo`) is
printed with the result.

The policy is SmolLM2-135M from its GGUF, or with `--shape` random weights of a named shape
(`shapes.py`), written once as an HF directory with a tokenizer trained on the training
questions (its ids all lie below the model's vocabulary; sampled ids above it decode to
nothing, so completions run to the length cap: the worst case). ReFT's paper-size step:

    python experiments/benchmarks/bench_ppo.py --shape smollm2-135m --questions 256 --total-len 700 \
        --dtype bfloat16 --dataset synthetic --steps 4                   # on a GPU (no data files needed)
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

import shapes  # noqa: E402  (this folder is on sys.path when the script runs)

PHASES = ("rollout", "reward", "score_dispatch", "score_wait", "score", "update", "prepare_next", "prefixes")


def write_random_model(cfg, shape: str, directory: pathlib.Path) -> None:
    """An HF directory: random weights of `shape` (float32) and a tokenizer trained on the
    run's training questions, as a from-scratch run trains one."""
    from reft_jax.data.splits import load_examples, tokenizer_corpus
    from reft_jax.data.tokenizer import train_tokenizer
    from reft_jax.model.io import save_hf

    splits = load_examples(cfg.data, cfg.seed)
    tokenizer = train_tokenizer(tokenizer_corpus(splits.train, cfg.data.engine), cfg.model.tokenizer_vocab_size)
    config = shapes.model_config(shape)
    save_hf(directory, config, shapes.random_params(config, cfg.seed), tokenizer)


def memory_plan(cfg, model_path: str) -> dict:
    """The plan `reft ppo` prints and checks before compiling (run.plan_memory's arguments),
    with any `auto` resolved, as a printable table and its totals."""
    from reft_jax import memory, parallel
    from reft_jax.model.io import load_config

    mc = load_config(model_path, **cfg.model.overrides())
    device = memory.device_memory_bytes(cfg.mesh)
    kwargs = dict(optim=cfg.optim, logprob_chunk=cfg.model.logprob_chunk, rollout_rows=cfg.rows,
                  prompt_len=cfg.data.max_prompt_len, ref_dtype=cfg.ref_dtype)
    try:
        choice = memory.resolve_auto("ppo", mc, parallel.build_mesh(cfg.mesh), batch=cfg.minibatch,
                                     seq_len=cfg.max_total_len, grad_accum=cfg.optim.grad_accum, remat=mc.remat,
                                     score_microbatches=cfg.score_microbatches, device_bytes=device, **kwargs)
    except memory.MemoryPlanError as e:
        return {"error": str(e), "text": f"memory plan refused: {e}"}
    plan = choice.plan
    return {"text": memory.format_plan(plan, device), "total_gib": shapes.gib(plan.total),
            "peak_program": plan.peak_program, "device_gib": None if device is None else shapes.gib(device),
            "programs_gib": {k: shapes.gib(sum(v.values())) for k, v in plan.programs.items()},
            "grad_accum": choice.grad_accum, "remat": choice.remat,
            "score_microbatches": choice.score_microbatches}


def run(args: argparse.Namespace) -> dict:
    from reft_jax import config as config_lib
    from reft_jax.metrics import read_metrics
    from reft_jax.train.loop import CompileLog
    from reft_jax.train.ppo import PPOConfig, run_ppo

    run_dir = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="bench_ppo_"))
    if args.shape:
        model_path = args.model or str(run_dir.parent / f"{run_dir.name}_{args.shape}_model")
    else:
        from reft_jax.model.io import smollm2_gguf_path

        model_path = args.model or str(smollm2_gguf_path())
    overrides = [
        f"run_dir={run_dir}", f"model.path={model_path}", "model.step=latest",
        f"data.dataset={args.dataset}", f"data.engine={args.engine}",
        f"data.max_train_examples={args.questions * (args.steps + 1)}", "data.max_test_examples=0", "data.overlong=truncate",
        f"batch_questions={args.questions}", f"max_total_len={args.max_total_len}", "epochs=1",
        f"max_steps={args.steps}", f"profile_sync={str(args.sync).lower()}", "mesh.fsdp=-1",
        f"optim.compute_dtype={args.dtype}", f"score_microbatches={args.score_microbatches}",
        f"optim.grad_accum={args.grad_accum}", "optim.lr=3e-7", f"model.remat={args.remat}",
    ]
    if args.dtype != "float32":  # the model (sampler, forwards) and the loss in the compute dtype
        overrides.append(f"model.dtype={args.dtype}")
    if args.max_new_tokens:
        overrides.append(f"max_new_tokens={args.max_new_tokens}")
    cfg = config_lib.load_config(PPOConfig, overrides=overrides + list(args.overrides))
    built = 0.0
    if args.shape and not pathlib.Path(model_path).exists():
        t0 = time.perf_counter()
        write_random_model(cfg, args.shape, pathlib.Path(model_path))
        built = time.perf_counter() - t0
    plan = memory_plan(cfg, model_path)  # the run prints the same plan itself before compiling
    compile0, counts0 = CompileLog.seconds, dict(CompileLog.counts)
    start = time.perf_counter()
    run_ppo(cfg)
    wall = time.perf_counter() - start
    compiles = {k: n - counts0.get(k, 0) for k, n in CompileLog.counts.items() if n > counts0.get(k, 0)}
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    steps = []
    for r in rows:
        phases = {p: r[f"train/time/{p}"] for p in PHASES if f"train/time/{p}" in r}
        steps.append({"step": r["step"], "seconds": cfg.rows / r["train/sequences_per_s"], **phases,
                      "compile": r.get("train/compile_seconds", float("nan")),
                      "prompt_width": r.get("train/prompt_width"), "seq_width": r.get("train/seq_width"),
                      "response_length": r["train/response_length"],
                      "response_length_max": r["train/response_length_max"], "score_mean": r["train/score_mean"],
                      "exec": {s: r.get(f"train/exec_{s}") for s in ("ok", "error", "timeout", "rejected")}})
    later = steps[1:] or steps
    return {"device": shapes.device_line(), "devices": jax.device_count(), "shape": args.shape or "smollm2-135m (GGUF)",
            "questions": args.questions, "max_total_len": args.max_total_len, "max_new_tokens": args.max_new_tokens,
            "sync": args.sync, "dtype": args.dtype, "wall_seconds": wall, "model_build_seconds": built,
            "steps": steps, "memory_plan": plan,
            "compile_seconds_in_steps": sum(s["compile"] for s in steps),
            "compile_seconds_in_run": CompileLog.seconds - compile0, "compiles": compiles,
            "steady_seconds_per_step": statistics.mean(s["seconds"] - s["compile"] for s in later)}


def print_table(result: dict) -> None:
    cols = ["step", "seconds", "compile", "rollout", "reward", "score_wait" if not result["sync"] else "score",
            "update", "response_length", "prompt_width", "seq_width"]
    plan = result["memory_plan"]
    print(f"{result['device']}; {result['shape']}, {result['questions']} questions, "
          f"max_total_len {result['max_total_len']}, max_new_tokens {result['max_new_tokens']}, "
          f"{'sync (no overlap)' if result['sync'] else 'overlapped'}, compute {result['dtype']}")
    if "total_gib" in plan:
        device = "unknown device memory" if plan["device_gib"] is None else f"of {plan['device_gib']:.1f} GiB"
        print(f"memory plan: {plan['total_gib']:.2f} GiB per device {device} (peak in the {plan['peak_program']} "
              f"program), grad_accum {plan['grad_accum']}, remat {plan['remat']}, "
              f"score_microbatches {plan['score_microbatches']}")
    print("  ".join(f"{c:>15}" for c in cols))
    for s in result["steps"]:
        print("  ".join(f"{s[c]:>15d}" if c == "step" else f"{s.get(c) if s.get(c) is not None else float('nan'):>15.2f}"
                        for c in cols)
              + f"   exec {s['exec']}, mean reward {s['score_mean']:.3f}")
    top = sorted(result["compiles"].items(), key=lambda kv: -kv[1])[:8]
    print(f"compile: {result['compile_seconds_in_steps']:.1f} s inside the steps, "
          f"{result['compile_seconds_in_run']:.1f} s in the whole run; compiles per function: "
          + ", ".join(f"{k} {n}" for k, n in top))
    print(f"steady state (compile excluded, steps after the first): "
          f"{result['steady_seconds_per_step']:.2f} s/step; wall {result['wall_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-total-len", "--total-len", type=int, default=700, dest="max_total_len",
                        help="prompt + completion tokens (ReFT: 700)")
    parser.add_argument("--shape", default=None, choices=list(shapes.SHAPES),
                        help="random weights of this shape (default: the SmolLM2-135M GGUF)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--dataset", default="svamp")
    parser.add_argument("--engine", default="python")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--score-microbatches", default="4", help="row blocks of the score pass, or auto")
    parser.add_argument("--grad-accum", default="4", help="micro-batches per update, or auto")
    parser.add_argument("--remat", default="none", help="none | layer | dots_saveable | auto")
    parser.add_argument("--sync", action="store_true", help="block after every phase (exact phase times)")
    parser.add_argument("--model", default=None, help="GGUF / HF dir / reft run dir (default SmolLM2-135M); "
                        "with --shape: where the random model is written (reused when it exists)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="extra PPOConfig overrides key=value")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
