"""Ctrl-C, then a kill, then the same command again: the run ends bitwise where an uninterrupted
run ends (every checkpoint array, every metric that does not measure time), `metrics.jsonl` has
each step once, and nothing half-written is left in `checkpoints/`.

Per trainer (SFT, PPO), through the `reft` CLI in subprocesses: a reference run; the same command
in another run directory, SIGINT once a few steps are logged (exit 130, the one-line message, no
traceback); the same command again, SIGKILL a step or two later; the same command to the end.
Every wait polls files and has a deadline: a run that hangs is killed and its stderr shown."""
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from reft_jax.checkpoint import COMMIT_MARKER
from reft_jax.metrics import read_metrics
from reft_jax.runlog import LOG_NAME

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "golden"))
import runs  # noqa: E402  (the golden runs' fingerprints: metrics without timing, checkpoint SHA-256s)

pytestmark = pytest.mark.slow

CONFIGS = REPO / "experiments" / "configs"
TINY = ["model.scratch.num_layers=2", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
        "model.scratch.num_heads=2", "model.scratch.num_kv_heads=1", "model.scratch.head_dim=16",
        "model.tokenizer_vocab_size=300", "mesh.fsdp=1"]
EVAL = ["data.max_test_examples=4", "eval.batch_size=4", "eval.max_new_tokens=8", "eval.max_total_len=96"]
SFT_BASE = ["sft", "--config", str(CONFIGS / "sft_synthetic_tiny.yaml"), *TINY, *EVAL,
            "data.synthetic={num_train: 64, num_test: 4}", "data.max_len=128", "data.max_prompt_len=64",
            "batch_size=16", "bucket=128", "warmup_epoch=1"]
# 16 SFT steps (4 epochs of 4), a checkpoint after every one, evaluations at steps 8 and 16
SFT = [*SFT_BASE, "epochs=4", "save_every_steps=1", "keep=2"]
# 13 PPO steps (one epoch of 4-question batches: 49 of the 152 questions fit 64 prompt tokens), a
# checkpoint after every one, evaluations at steps 0, 4, 8, 12 and 13
PPO = ["ppo", "--config", str(CONFIGS / "ppo_synthetic_tiny.yaml"), *EVAL,
       "data.synthetic={num_train: 160, num_test: 4}", "data.max_prompt_len=64", "epochs=1",
       "batch_questions=4", "n_samples=2", "mini_batch_size=8", "ppo_epochs=1", "max_new_tokens=8",
       "max_total_len=96", "value_head_init=torch_default", "vf_coef=5.0", "save_every_steps=1",
       "eval.every_steps=4", "keep=2"]
START = 300.0  # seconds a run may take to log its first steps (it compiles first) or to finish
INTERRUPTED = re.compile(r"reft (?P<cmd>\w+): interrupted: interrupted at step (?P<step>\d+); nothing "
                         r"half-written\. Run the same command to resume from (step (?P<resume>\d+)|the start) "
                         r"\((?P<dir>\S+)\)\. \(log: (?P<log>\S+)\)")


def env(cache: pathlib.Path) -> dict[str, str]:
    # the compile cache a resumed run uses by default: its programs load instead of compiling
    return {**runs.env(), "REFT_COMPILE_CACHE": str(cache)}


class Run:
    """One `reft` process; its output goes to files, so nothing blocks on a full pipe."""

    def __init__(self, argv: list[str], run_dir: pathlib.Path, cache: pathlib.Path, tag: str):
        self.run_dir, self.tag = run_dir, tag
        self.out = open(run_dir.parent / f"{run_dir.name}.{tag}.out", "w+")
        self.err = open(run_dir.parent / f"{run_dir.name}.{tag}.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "reft_jax.cli", *argv, f"run_dir={run_dir}"],
                                     env=env(cache), cwd=REPO, stdout=self.out, stderr=self.err)

    def stderr(self) -> str:
        self.err.flush()
        return pathlib.Path(self.err.name).read_text()

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        pytest.fail(f"{self.tag} run in {self.run_dir}: {why}\n--- stderr (end) ---\n{self.stderr()[-4000:]}")

    def wait(self, timeout: float = START) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {timeout:.0f} s (hung?)")

    def wait_for_step(self, step: int, timeout: float = START) -> int:
        """Poll metrics.jsonl until a train row of step >= `step`; returns the newest step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            newest = max(train_steps(self.run_dir), default=0)
            if newest >= step:
                return newest
            if self.proc.poll() is not None:
                self.fail(f"exited {self.proc.returncode} before step {step} was logged (steps too fast?)")
            time.sleep(0.02)
        self.fail(f"step {step} not logged within {timeout:.0f} s")


def train_steps(run_dir: pathlib.Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # being written (or cut by a kill)
            continue
        if any(k.startswith("train/") for k in row):
            steps.append(row["step"])
    return steps


def half_written(run_dir: pathlib.Path) -> list[str]:
    """Entries of checkpoints/ (and warmup/) that are not committed Orbax steps."""
    bad = []
    for sub in ("checkpoints", "warmup"):
        base = run_dir / sub
        if base.is_dir():
            bad += [f"{sub}/{p.name}" for p in base.iterdir()
                    if not (p.name.isdigit() and (p / COMMIT_MARKER).is_file())]
    return bad


def rows_by_kind(run_dir: pathlib.Path, kind: str) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith(f"{kind}/") for k in r)]


def finish(run: Run) -> None:
    if run.wait() != 0:
        run.fail(f"exit {run.proc.returncode}")
    assert "Traceback" not in run.stderr(), run.stderr()[-4000:]


def interrupt_kill_resume(argv: list[str], name: str, root: pathlib.Path, cache: pathlib.Path, total: int,
                          from_start: bool = False) -> None:
    """`from_start`: the interruptions come before the first checkpoint (the run starts over)."""
    reference = root / f"{name}_reference"
    finish(Run(argv, reference, cache, "reference"))
    assert train_steps(reference) == list(range(1, total + 1))

    run_dir = root / f"{name}_interrupted"
    # 1. Ctrl-C once a few steps are logged
    first = Run(argv, run_dir, cache, "sigint")
    first.wait_for_step(3)
    first.proc.send_signal(signal.SIGINT)
    status, err = first.wait(120), first.stderr()
    if status != 130:
        first.fail(f"exit {status} after SIGINT, expected 130")
    assert "Traceback" not in err, err[-4000:]
    last = err.strip().splitlines()[-1]
    m = INTERRUPTED.fullmatch(last)
    assert m and m["cmd"] == name, last
    assert pathlib.Path(m["dir"]) == run_dir / "checkpoints" and pathlib.Path(m["log"]) == run_dir / LOG_NAME
    assert 3 <= int(m["step"]) < total
    assert m["resume"] is None if from_start else int(m["resume"]) <= int(m["step"])
    assert not half_written(run_dir), half_written(run_dir)  # the save in flight finished as the run closed
    log = (run_dir / LOG_NAME).read_text()
    assert last in log and "KeyboardInterrupt" in log  # the details the line leaves out

    # 2. the same command resumes; SIGKILL it two steps on
    reached = max(train_steps(run_dir))
    second = Run(argv, run_dir, cache, "sigkill")
    second.wait_for_step(reached + 2)
    second.proc.kill()
    second.wait(60)

    # 3. the same command runs to the end
    finish(Run(argv, run_dir, cache, "resume"))

    assert not half_written(run_dir), half_written(run_dir)
    assert runs.checkpoint_digests(run_dir) == runs.checkpoint_digests(reference)
    assert runs.metric_rows(run_dir) == runs.metric_rows(reference)
    for kind in ("train", "eval"):
        steps = rows_by_kind(run_dir, kind)
        assert len(steps) == len(set(steps)), f"{kind} rows repeat a step: {steps}"
        assert steps == rows_by_kind(reference, kind)
    assert rows_by_kind(run_dir, "train") == list(range(1, total + 1))
    assert log in (run_dir / LOG_NAME).read_text()  # appended to, never rewritten


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("xla_cache")


def test_sft_interrupted_killed_and_resumed_is_bitwise_the_uninterrupted_run(tmp_path, cache):
    interrupt_kill_resume(SFT, "sft", tmp_path, cache, total=16)


def test_sft_interrupted_before_its_first_checkpoint_starts_over_with_each_step_once(tmp_path, cache):
    """16 steps of 4 examples and one checkpoint, at the end: the Ctrl-C and the kill both come
    before it, so the run starts over twice; the rows of the attempts before are dropped."""
    interrupt_kill_resume([*SFT_BASE, "epochs=1", "batch_size=4", "save_every_steps=0"], "sft", tmp_path, cache,
                          total=16, from_start=True)


def test_ppo_interrupted_killed_and_resumed_is_bitwise_the_uninterrupted_run(tmp_path, cache):
    warmup = tmp_path / "warmup"
    finish(Run([*SFT_BASE, "epochs=1"], warmup, cache, "warmup"))
    interrupt_kill_resume(PPO + [f"model.path={warmup}"], "ppo", tmp_path, cache, total=13)


def test_ctrl_c_after_the_last_step_is_saved_exits_0(tmp_path, cache):
    """Once the last checkpoint is committed only the plots are left: a Ctrl-C then (while the
    command closes the run and draws them) ends the command as a finished run, summary included."""
    run_dir = tmp_path / "sft"
    run = Run([*SFT_BASE, "epochs=1"], run_dir, cache, "late")
    last = run_dir / "checkpoints" / "4" / COMMIT_MARKER  # 4 steps, one checkpoint at the end
    deadline = time.monotonic() + START
    while not last.exists():
        if run.proc.poll() is not None or time.monotonic() > deadline:
            run.fail(f"no committed step 4 while it ran (exit {run.proc.returncode})")
        time.sleep(0.01)
    if run.proc.poll() is not None:
        run.fail("finished before the Ctrl-C")
    run.proc.send_signal(signal.SIGINT)
    finish(run)
    out = pathlib.Path(run.out.name).read_text()
    summary = json.loads(out[out.rindex("\n{") + 1:])  # the summary, printed last
    assert summary["step"] == 4 and summary["run_dir"] == str(run_dir)
    tail = run.stderr().strip().splitlines()[-1]
    note = "reft sft: interrupted after the last step was saved; the run is complete (plots not drawn)"
    assert tail == note or tail.startswith("sft: 100%"), tail  # the latter: it landed as the summary printed
