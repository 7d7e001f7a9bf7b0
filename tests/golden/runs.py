"""Short fixed-seed runs of the four trainers on the tiny synthetic configs, and their
fingerprints: every metric that does not measure time, bit for bit, and a SHA-256 of every
checkpoint's arrays. `record.py` writes them to `golden.json`; `test_golden.py` runs the same
commands again and compares (the refactors of the run loop must leave them unchanged).

The runs go through the `reft` CLI in a fresh interpreter on one CPU device, so they measure
exactly what a user's command does."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
GOLDEN = pathlib.Path(__file__).with_name("golden.json")

# Small data: 480 train questions (456 after the 5% validation carve), 16 test questions; enough
# SFT steps that the warm-up writes answers (non-zero rewards, so PPO's updates are not zero).
DATA = ["data.synthetic.num_train=480", "data.synthetic.num_test=16", "data.max_test_examples=16"]
# The RL phases: 160 questions (152 after the carve), so an epoch is 4 rollout steps of 32.
RL_DATA = ["data.synthetic.num_train=160", "data.synthetic.num_test=16", "data.max_test_examples=16"]


def commands(root: pathlib.Path) -> dict[str, list[str]]:
    sft, ppo = root / "sft", root / "ppo"
    off, on, ver = root / "offline", root / "online", root / "verifier"
    return {
        "sft": ["sft", "--config", str(CONFIGS / "sft_synthetic_tiny.yaml"), f"run_dir={sft}", *DATA,
                "epochs=3", "warmup_epoch=3", "eval.every_epochs=3", "eval.max_new_tokens=24",
                "eval.batch_size=16"],
        "ppo": ["ppo", "--config", str(CONFIGS / "ppo_synthetic_tiny.yaml"), f"run_dir={ppo}",
                f"model.path={sft}", *RL_DATA, "epochs=1", "batch_questions=32", "n_samples=2",
                "mini_batch_size=32", "ppo_epochs=2", "max_new_tokens=24", "eval.max_new_tokens=24",
                "eval.batch_size=16"],
        "selftrain_offline": ["selftrain", "--mode", "offline", "--config",
                              str(CONFIGS / "selftrain_synthetic_tiny.yaml"), f"offline.warmup.path={sft}",
                              "offline.k=2", "offline.max_new_tokens=24", f"offline.sft.run_dir={off}",
                              "offline.sft.epochs=1", "offline.sft.batch_size=64", "offline.sft.eval.max_new_tokens=24",
                              "offline.sft.eval.batch_size=16",
                              *("offline.sft." + d for d in DATA)],
        "selftrain_online": ["selftrain", "--mode", "online", "--config",
                             str(CONFIGS / "selftrain_synthetic_tiny.yaml"), f"online.run_dir={on}",
                             f"online.model.path={sft}", "online.epochs=1", "online.batch_questions=32",
                             "online.max_new_tokens=24", "online.eval.max_new_tokens=24",
                             "online.eval.batch_size=16", *("online." + d for d in RL_DATA)],
        "rerank_train": ["rerank", "train", "--config", str(CONFIGS / "verifier_synthetic_tiny.yaml"),
                         f"run_dir={ver}", f"train_samples={off / 'selftrain_samples.jsonl'}",
                         f"model.path={sft}", "epochs=1", "max_len=160", "eval.every_steps=4",
                         "data.synthetic.num_train=480", "data.synthetic.num_test=16"],
    }


def run_dirs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {"sft": root / "sft", "ppo": root / "ppo", "selftrain_offline": root / "offline",
            "selftrain_online": root / "online", "rerank_train": root / "verifier"}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["TQDM_DISABLE"] = "1"
    return e


def run_all(root: pathlib.Path, only: list[str] | None = None) -> None:
    for name, argv in commands(root).items():
        if only is not None and name not in only:
            continue
        proc = subprocess.run([sys.executable, "-m", "reft_jax.cli", *argv], env=env(), cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _timing(key: str) -> bool:
    return any(t in key for t in ("time", "per_s", "seconds", "compile"))


def metric_rows(run_dir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without wall-clock quantities; floats as their exact hex."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: (float(v).hex() if isinstance(v, float) else v) for k, v in sorted(row.items())
                     if not _timing(k) and k not in ("wall_time", "timestamp")})
    return rows


def checkpoint_digests(run_dir: pathlib.Path) -> dict[str, str]:
    """SHA-256 of each checkpoint step's arrays (paths and bytes), read back through Orbax."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    out = {}
    for sub in ("checkpoints", "warmup"):
        base = run_dir / sub
        if not base.is_dir():
            continue
        for step_dir in sorted(p for p in base.iterdir() if p.name.isdigit()):
            with ocp.StandardCheckpointer() as ckpt:
                tree = ckpt.restore(step_dir / "state")
            h = hashlib.sha256()
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                h.update(jax.tree_util.keystr(path).encode())
                if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
                    leaf = jax.random.key_data(leaf)
                arr = np.asarray(jax.device_get(leaf))
                h.update(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes())
            out[f"{sub}/{step_dir.name}"] = h.hexdigest()
    return out


def fingerprint(root: pathlib.Path) -> dict:
    return {name: {"metrics": metric_rows(d), "checkpoints": checkpoint_digests(d)}
            for name, d in run_dirs(root).items()}


def _number(v):
    """A recorded value back to a number (floats are stored as exact hex)."""
    if isinstance(v, str) and v.lstrip("-").startswith("0x"):
        return float.fromhex(v)
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def differences(golden: dict, now: dict) -> list[str]:
    """Human-readable differences; metric keys new since the recording are allowed."""
    out = []
    for name, rec in golden.items():
        got = now.get(name)
        if got is None:
            out.append(f"{name}: missing")
            continue
        if len(rec["metrics"]) != len(got["metrics"]):
            out.append(f"{name}: {len(got['metrics'])} metric rows, recorded {len(rec['metrics'])}")
        for i, (a, b) in enumerate(zip(rec["metrics"], got["metrics"])):
            for k, v in a.items():
                fa, fb = _number(v), _number(b.get(k))
                if fa != fb and not (fa != fa and fb != fb):  # equal values (an int 1 == 1.0), or both NaN
                    out.append(f"{name}: row {i} {k}: {fb!r}, recorded {fa!r}")
        if rec["checkpoints"] != got["checkpoints"]:
            out.append(f"{name}: checkpoints {got['checkpoints']} != recorded {rec['checkpoints']}")
    return out
