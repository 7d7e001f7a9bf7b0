"""The one training loop: the same divergence policy, message, exit status and kept checkpoint
from every trainer's command; the collapse guard; metrics rows once after a resume."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from reft_jax.checkpoint import COMMIT_MARKER
from reft_jax.data.prompts import ANSWER_TRIGGER
from reft_jax.data.synthetic import SyntheticConfig, generate
from reft_jax.metrics import MetricsWriter, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRATCH = ["model.scratch.num_layers=2", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
           "model.scratch.num_heads=2", "model.scratch.num_kv_heads=1", "model.scratch.head_dim=16",
           "model.tokenizer_vocab_size=300", "mesh.fsdp=1"]
SYN = "data.synthetic={num_train: 64, num_test: 4}"
DATA = [SYN, "data.dataset=synthetic", "data.engine=nl", "data.max_test_examples=4", "data.max_len=128",
        "data.max_prompt_len=64"]
EVAL = ["eval.batch_size=4", "eval.max_new_tokens=8", "eval.max_total_len=96"]
# lr 1e30: the first update leaves finite (huge) params; the next forward overflows to NaN.
BLOW_UP = ["optim.lr=1e30", "optim.schedule=constant", "optim.warmup_ratio=0.0", "save_every_steps=1"]


def reft(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "reft_jax.cli", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def steps_on_disk(run_dir: pathlib.Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists())


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("loop") / "sft"
    proc = reft("sft", "--config", str(REPO / "experiments/configs/sft_synthetic_tiny.yaml"), f"run_dir={run_dir}",
                *SCRATCH, *DATA, *EVAL, "epochs=1", "warmup_epoch=1", "batch_size=16", "bucket=128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory) -> pathlib.Path:
    """A train-split sample file: per question its gold solution (correct) and a wrong one."""
    rows = generate(SyntheticConfig(num_train=64, num_test=4), "train", "nl")
    path = tmp_path_factory.mktemp("samples") / "train_samples.jsonl"
    with open(path, "w") as f:
        for ex in rows[:32]:
            good = ex.answer_cot + ANSWER_TRIGGER + ex.answer_value
            bad = ex.answer_cot + ANSWER_TRIGGER + str(int(float(ex.answer_value)) + 7)
            f.write(json.dumps({"item_id": ex.item_id, "completions": [good, bad]}) + "\n")
    return path


def commands(tmp: pathlib.Path, sft: pathlib.Path, samples: pathlib.Path) -> dict[str, tuple[list[str], pathlib.Path]]:
    cfgs = REPO / "experiments/configs"
    return {
        "sft": (["sft", "--config", str(cfgs / "sft_synthetic_tiny.yaml"), f"run_dir={tmp / 'sft'}", *SCRATCH, *DATA,
                 *EVAL, "epochs=1", "warmup_epoch=1", "batch_size=16", "bucket=128", *BLOW_UP], tmp / "sft"),
        "ppo": (["ppo", "--config", str(cfgs / "ppo_synthetic_tiny.yaml"), f"run_dir={tmp / 'ppo'}",
                 f"model.path={sft}", *DATA, *EVAL, "epochs=1", "batch_questions=8", "n_samples=2",
                 "mini_batch_size=16", "ppo_epochs=1", "max_new_tokens=8", "max_total_len=96",
                 # the loaded (random) value head: a non-zero value loss, so the first update moves
                 # the params even when every reward is 0
                 "value_head_init=torch_default", "vf_coef=5.0", "eval_at_start=false", *BLOW_UP], tmp / "ppo"),
        "selftrain online": (["selftrain", "--mode", "online", "--config", str(cfgs / "selftrain_synthetic_tiny.yaml"),
                              f"online.run_dir={tmp / 'online'}", f"online.model.path={sft}",
                              *(f"online.{o}" for o in DATA + EVAL + BLOW_UP), "online.epochs=1",
                              "online.updates_per_step=1",
                              "online.batch_questions=8", "online.max_new_tokens=8", "online.max_total_len=96"],
                             tmp / "online"),
        "rerank train": (["rerank", "train", "--config", str(cfgs / "verifier_synthetic_tiny.yaml"),
                          f"run_dir={tmp / 'verifier'}", f"train_samples={samples}", f"model.path={sft}", SYN,
                          "batch_size=8", "max_len=128", "epochs=1", *BLOW_UP], tmp / "verifier"),
    }


LINE = re.compile(r"^reft (?P<cmd>[a-z ]+): training diverged: non-finite loss \S+ \(grad norm \S+\) at step "
                  r"(?P<step>\d+) \(epoch 1, batch \d+/\d+\); the run stopped without saving it\. The last good "
                  r"checkpoint is step (?P<good>\d+) in (?P<dir>\S+)\. Lower optim\.lr")


@pytest.mark.slow
def test_every_trainer_diverges_the_same_way(tmp_path, sft_run, samples_file):
    """One NaN policy: each command ends in one line, exit status 1, and keeps the last good
    checkpoint (finite params) with nothing saved after it."""
    seen = {}
    for name, (argv, run_dir) in commands(tmp_path, sft_run, samples_file).items():
        proc = reft(*argv)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{name}:\n{proc.stderr[-3000:]}"
        m = LINE.match(last)
        assert m and m["cmd"] == name.replace(" online", ""), f"{name}: {last!r}"
        step, good = int(m["step"]), int(m["good"])
        assert good == step - 1 and pathlib.Path(m["dir"]) == run_dir / "checkpoints"
        assert steps_on_disk(run_dir)[-1] == good  # nothing saved at or after the bad step
        seen[name] = (step, good)
    assert len(seen) == 4


@pytest.mark.slow
def test_collapse_guard_stops_a_dead_run(tmp_path):
    """optim.lr=1e6 leaves a finite but dead SFT model (zero gradient / uniform loss)."""
    run_dir = tmp_path / "sft"
    proc = reft("sft", "--config", str(REPO / "experiments/configs/sft_synthetic_tiny.yaml"), f"run_dir={run_dir}",
                *SCRATCH, *DATA, *EVAL, "epochs=2", "warmup_epoch=1", "batch_size=8", "bucket=128",
                "data.max_test_examples=0", "optim.lr=1e6", "optim.schedule=constant", "optim.warmup_ratio=0.0",
                "guard.window=3", "save_every_steps=1")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"reft sft: training diverged: collapsed: (gradient norm below|loss at ln\(vocab\)).* for 3 steps "
                    r"at step \d+ .*The last good checkpoint is step \d+", last), last


def test_metrics_rows_of_redone_steps_are_dropped(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for s in range(1, 6):
            w.write(s, {"loss": float(s)}, prefix="train")
        w.write(4, {"accuracy": 0.5}, prefix="eval")
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=3) as w:
        w.write(4, {"loss": 40.0}, prefix="train")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert train == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert not any("eval/accuracy" in r for r in rows)
