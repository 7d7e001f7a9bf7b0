"""`reft demo` is deterministic: the same command with the same seed, run twice from a clean
state (fresh interpreters, new run directories, a different Python hash seed each), prints the
same table and writes the same metrics, bit for bit apart from wall-clock quantities."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "golden"))
from runs import metric_rows as metrics  # noqa: E402  (metrics.jsonl without wall-clock keys, floats as hex)

REPO = pathlib.Path(__file__).resolve().parents[2]
# a shortened demo: about 2 CPU minutes a run (measured: 122 s user+sys each)
SHORT = ["sft.epochs=2", "sft.warmup_epoch=1", "sft.data.synthetic.num_train=256", "sft.data.max_test_examples=32",
         "sft.eval.every_epochs=1", "ppo.epochs=1", "ppo.batch_questions=32", "vote_k=2"]


def run_demo(run_dir: pathlib.Path, hash_seed: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TQDM_DISABLE="1",
               PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "reft_jax.cli", "demo", "--run-dir", str(run_dir), *SHORT],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"reft demo exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table(stdout: str) -> str:
    """The printed results table: from its header line to the seeds line."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("policy"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("held-out split"))
    return "\n".join(lines[start:end + 1])


@pytest.mark.slow
def test_demo_twice_prints_the_same_table_and_metrics(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    out_a, out_b = run_demo(first, "1"), run_demo(second, "2")
    assert table(out_a) == table(out_b), f"tables differ:\n{table(out_a)}\n---\n{table(out_b)}"
    for phase in ("sft", "ppo"):
        rows_a, rows_b = metrics(first / "seed0" / phase), metrics(second / "seed0" / phase)
        assert rows_a, phase
        diff = [(a, b) for a, b in zip(rows_a, rows_b) if a != b]
        assert len(rows_a) == len(rows_b) and not diff, f"{phase}: first difference {diff[:1]}"
    results = [json.loads((d / "summary.json").read_text())["results"] for d in (first, second)]
    assert results[0] == results[1]
    # a run this short may well score 0 everywhere (the table alone would prove little): the
    # training losses, PPO losses and KL compared bit for bit above are what measure it
    sft_rows, ppo_rows = metrics(first / "seed0" / "sft"), metrics(first / "seed0" / "ppo")
    assert sum("train/loss" in r for r in sft_rows) >= 10
    assert any("train/loss" in r for r in ppo_rows) and any("train/approx_kl" in r for r in ppo_rows)
