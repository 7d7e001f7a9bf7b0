"""ReFT's Table 4 reranking recipe end to end, at tiny scale, through the `reft` CLI.

As experiments/README.md gives it: an SFT run; `reft sample` of train completions from its
warm-up and of test completions from its best step; `reft rerank train` on the train samples
(evaluated on the test samples); `reft rerank score` of the test samples; and the same
policy's rerank@k and voting@k through `reft eval`. Each command runs in a fresh interpreter
on one CPU device, exactly as a user's shell would run it; each step's outputs are checked.
"""
from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
K = 4  # samples per question (ReFT: 100)
N_TRAIN, N_TEST = 32, 16  # questions sampled from each split
# Small synthetic data: enough SFT steps that the warm-up writes answers, some right, some wrong.
DATA = ["data.synthetic.num_train=240", "data.synthetic.num_test=16", "data.max_test_examples=16"]
# ReFT's sampling settings (temperature 1, top-k 50: the defaults), with a total cap that fits
# the synthetic problems (ReFT: 1,024)
SAMPLING = ["--n", str(K), "--temperature", "1", "--top-k", "50", "--max-total-len", "128", "--batch-size", "16",
            "--no-progress"]


def reft(*argv: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TQDM_DISABLE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "reft_jax.cli", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"reft {argv[0]} {argv[1] if len(argv) > 1 else ''}: {time.perf_counter() - start:.1f} s wall, "
          f"{used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.1f} s CPU")
    assert proc.returncode == 0, f"reft {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_json(stdout: str) -> dict:
    """The metrics JSON object a command prints last (other lines may follow it)."""
    return json.JSONDecoder().raw_decode(stdout, stdout.rindex("\n{") + 1)[0]


@pytest.mark.slow
def test_reranking_recipe_end_to_end(tmp_path):
    from reft_jax.data.prompts import rollout_prefix
    from reft_jax.data.sources import DataConfig, load_config_dataset

    sft, samples, verifier = tmp_path / "sft", tmp_path / "samples", tmp_path / "verifier"
    # 1. SFT with a warm-up (end of epoch 1) and a best test epoch
    reft("sft", "--config", str(CONFIGS / "sft_synthetic_tiny.yaml"), f"run_dir={sft}", *DATA, "epochs=3",
         "warmup_epoch=1", "eval.every_epochs=1", "eval.max_new_tokens=24", "eval.batch_size=16")
    assert (sft / "warmup").is_dir()

    # 2. train completions from the warm-up; the engine comes from the run's config (N-CoT: no header)
    train_file = samples / "warmup_train.jsonl"
    out = reft("sample", "--model", str(sft), "--step", "warmup", "--dataset", "synthetic", "--split", "train",
               "--max-examples", str(N_TRAIN), *SAMPLING, "--out", str(train_file))
    assert "(warmup)" in out and "engine nl" in out
    train = read_jsonl(train_file)
    knobs = yaml.safe_load((sft / "config.yaml").read_text())["data"]["synthetic"]
    saved = DataConfig(dataset="synthetic", engine="nl", synthetic=knobs)
    rows = load_config_dataset(saved, "train")[:N_TRAIN]
    assert [r["item_id"] for r in train] == [r.item_id for r in rows]
    assert [r["answer_value"] for r in train] == [r.answer_value for r in rows]
    assert [r["prompt"] for r in train] == [rollout_prefix(r.question, "nl") for r in rows]
    assert all(len(r["completions"]) == K and all(isinstance(c, str) for c in r["completions"]) for r in train)

    # 3. test completions from the policy to rerank (its best test epoch)
    test_file = samples / "sft_test.jsonl"
    reft("sample", "--model", str(sft), "--step", "best", "--dataset", "synthetic", "--split", "test",
         "--engine", "nl", *SAMPLING, "--out", str(test_file))
    test = read_jsonl(test_file)
    assert len(test) == N_TEST and all(len(r["completions"]) == K for r in test)
    assert len({r["item_id"] for r in test}) == N_TEST

    # 4. the verifier, from the best SFT checkpoint, on the warm-up's train samples
    out = reft("rerank", "train", "--config", str(CONFIGS / "verifier_synthetic_tiny.yaml"), f"run_dir={verifier}",
               f"train_samples={train_file}", f"eval_samples={test_file}", f"model.path={sft}", "model.step=best",
               "epochs=1", "max_len=160", "eval.every_steps=1000", *DATA[:2])
    marker = json.loads((verifier / "verifier.json").read_text())
    assert marker["best_metric"] == f"rerank@{K}_accuracy" and marker["step"] == "best"
    records = read_jsonl(verifier / "metrics.jsonl")
    evals = [r for r in records if f"eval/rerank@{K}_accuracy" in r]
    assert evals and 0.0 <= evals[-1][f"eval/rerank@{K}_accuracy"] <= 1.0
    assert any("train/loss" in r for r in records)

    # 5. rerank the test samples
    picks_file = tmp_path / "picks.jsonl"
    metrics = last_json(reft("rerank", "score", "--verifier", str(verifier), "--samples", str(test_file),
                             "--dataset", "synthetic", "--engine", "nl", "--out", str(picks_file)))
    assert metrics["num_questions"] == N_TEST
    for key in (f"rerank@{K}_accuracy", f"vote@{K}_accuracy", f"pass@{K}"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # reranking picks among the samples: never above the any-correct bound
    assert metrics[f"rerank@{K}_accuracy"] <= metrics[f"pass@{K}"]
    assert metrics[f"vote@{K}_accuracy"] <= metrics[f"pass@{K}"]
    assert len(read_jsonl(picks_file)) == N_TEST

    # 6. the same through `reft eval --strategy rerank` (it samples the test set itself)
    metrics = last_json(reft("eval", "--checkpoint", str(sft), "--step", "best", "--dataset", "synthetic",
                             "--engine", "nl", "--strategy", "rerank", "--k", str(K), "--verifier", str(verifier),
                             "--prefix", "rollout", "--max-new-tokens", "96", "--max-total-len", "128",
                             "--batch-size", "16"))
    assert metrics["num_examples"] == N_TEST
    assert 0.0 <= metrics[f"rerank@{K}_accuracy"] <= metrics[f"pass@{K}"] <= 1.0
    summary = json.loads((sft / "eval" / f"rerank@{K}_best.summary.json").read_text())
    assert summary["k"] == K and summary["strategy"] == "rerank"
