"""Errors outside the training loop, through the real CLI in a subprocess: each ends in one line
on stderr and its exit status, with nothing in the run directory lost or moved.

Tests marked `needs_hook` exercise a check the training layer calls (train/run.py,
train/sft.py); they run once that call is in place."""
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["model.scratch.num_layers=2", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
        "model.scratch.num_heads=2", "model.scratch.num_kv_heads=1", "model.scratch.head_dim=16",
        "model.tokenizer_vocab_size=300", "mesh.fsdp=1", "data.synthetic={num_train: 64, num_test: 4}",
        "data.max_test_examples=4", "data.max_len=128", "data.max_prompt_len=64", "eval.batch_size=4",
        "eval.max_new_tokens=8", "eval.max_total_len=96", "batch_size=16", "bucket=128"]
SFT_YAML = str(REPO / "experiments/configs/sft_synthetic_tiny.yaml")
EVAL = ["--dataset", "synthetic", "--engine", "nl", "--max-new-tokens", "4", "--batch-size", "4", "--mesh", "1,1,1"]


def reft(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "reft_jax.cli", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def tree(path: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def hooked(module: str, call: str) -> bool:
    import importlib

    return call in inspect.getsource(importlib.import_module(module))


needs_lengths_hook = pytest.mark.skipif(not hooked("reft_jax.train.run", "check_lengths"),
                                        reason="train/run.py does not call data.lengths.check_lengths yet")
needs_run_dir_hook = pytest.mark.skipif(not hooked("reft_jax.train.run", "check_run_dir"),
                                        reason="train/run.py open_or_start does not call check_run_dir yet")
needs_restore_hook = pytest.mark.skipif(not hooked("reft_jax.train.run", "restore_selected"),
                                        reason="train/run.py load_run_params does not call restore_selected yet")
needs_overlong_hook = pytest.mark.skipif(not hooked("reft_jax.train.sft", "fit_examples"),
                                         reason="train/sft.py does not call data.lengths.fit_examples yet")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> pathlib.Path:
    """A finished tiny run: checkpoints at steps 4 and 8 (two epochs)."""
    run_dir = tmp_path_factory.mktemp("cli") / "sft"
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={run_dir}", *TINY, "epochs=2", "warmup_epoch=1", "keep=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    return run_dir


def data_files(step: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in step.rglob("*") if f.is_file() and f.parent.name == "d"]


def zero(step: pathlib.Path) -> None:
    for f in data_files(step):
        f.write_bytes(bytes(f.stat().st_size))


def truncate(step: pathlib.Path) -> None:
    for f in data_files(step):
        with open(f, "r+b") as handle:
            handle.truncate(f.stat().st_size // 3)


@needs_restore_hook
@pytest.mark.parametrize("damage", [zero, truncate])
def test_eval_latest_falls_back_past_a_damaged_checkpoint(sft_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    damage(run / "checkpoints" / "8")
    before = tree(run / "checkpoints")
    proc = reft("eval", "--checkpoint", str(run), "--step", "latest", *EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the failed read's other TensorStore reads once printed 'Event loop is closed' tracebacks
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("reft eval: warning:")]
    assert warnings[0].startswith(f"reft eval: warning: checkpoint step 8 in {run}/checkpoints is unusable: "
                                  "state unreadable: ") and warnings[0].endswith("; skipping it and trying an older one")
    assert "TensorStore" not in warnings[0] and "tensorstore_spec" not in warnings[0] and len(warnings[0]) < 600
    assert warnings[1] == f"reft eval: warning: using step 4, the newest usable checkpoint in {run}/checkpoints"
    assert len(proc.stderr.splitlines()) < 12, proc.stderr  # was 159 lines ending in a TensorStore spec
    summary = json.loads((run / "eval" / "greedy@0_latest.summary.json").read_text())
    assert (summary["step"], summary["epoch"]) == (4, 1)  # the checkpoint evaluated, not the damaged one
    assert tree(run / "checkpoints") == before  # a reader moves nothing


def test_eval_explicit_damaged_step_is_one_line(sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    truncate(run / "checkpoints" / "8")
    before = tree(run)
    proc = reft("eval", "--checkpoint", str(run), "--step", "8", *EVAL)
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith(f"reft eval: error: checkpoint step 8 in {run}/checkpoints is unusable: state unreadable: ")
    assert "TensorStore" not in line and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert tree(run) == before


def test_sft_resume_moves_a_damaged_checkpoint_aside_quietly(sft_run, tmp_path):
    """The same command again resumes from the newest usable step: the damaged one is warned
    about and moved to checkpoints/_unusable/ (kept, byte for byte), with no traceback."""
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    zero(run / "checkpoints" / "8")
    damaged = tree(run / "checkpoints" / "8")
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={run}", *TINY, "epochs=2", "warmup_epoch=1", "keep=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    warned = [x for x in proc.stderr.splitlines() if x.startswith("reft sft: warning: ")]
    assert warned and warned[0].startswith(f"reft sft: warning: checkpoint step 8 in {run}/checkpoints is unusable: "
                                           "state unreadable: "), proc.stderr[-3000:]
    assert "CheckpointWarning" not in proc.stderr  # one plain line, not Python's file:line: form
    assert len(proc.stderr.splitlines()) < 20, proc.stderr  # was 279 lines
    moved = list((run / "checkpoints" / "_unusable").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("8-") and tree(moved[0]) == damaged
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]


def test_eval_data_file_messages(tmp_path):
    jsonl = tmp_path / "rows.json"
    jsonl.write_text('{"item_id": "svamp_0", "question": "q", "answer_value": "1"}\n'
                     '{"item_id": "svamp_1", "question": "q", "answer_value": "2"}\n')
    cut = tmp_path / "cut.json"
    cut.write_text('[{"item_id": "svamp_0", "question": "Ann ha')
    for path, message in [
        (jsonl, f"{jsonl}: this is JSON Lines (one object per line); expected one JSON list of objects "
                "(ReFT's format: [{...}, {...}])"),
        (cut, f"{cut}: malformed JSON: Unterminated string starting at line 1 column 37"),
    ]:
        proc = reft("eval", "--checkpoint", str(tmp_path / "none"), "--data", str(path), "--engine", "nl")
        assert proc.returncode == 2
        assert last_line(proc) == f"reft eval: error: {message}"
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr=-1: must be > 0"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in [0, 1)"),
])
def test_sft_config_ranges(tmp_path, override, message):
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={tmp_path / 'run'}", override)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"reft sft: error: invalid config: {message}"
    assert not (tmp_path / "run").exists()


@needs_lengths_hook
def test_sft_max_len_beyond_the_model(tmp_path):
    run = tmp_path / "run"
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={run}", *TINY, "data.max_len=2048",
                "model.scratch.max_position_embeddings=512")
    assert proc.returncode == 2
    assert last_line(proc) == ("reft sft: error: data.max_len=2048: longer than the model's "
                               f"max_position_embeddings=512; lower it to at most 512 (log: {run / 'log.txt'})")
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@needs_overlong_hook
def test_sft_overlong_error(tmp_path):
    run = tmp_path / "run"
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={run}", *TINY, "data.max_len=40", "data.overlong=error")
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith("reft sft: error: the synthetic train split: ") and \
        "training examples are longer than data.max_len=40 tokens (longest: synthetic_" in line
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@needs_run_dir_hook
def test_unusable_run_dir(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for run_dir, message in [
        (afile, f"run_dir='{afile}': is a file, not a directory; choose another run_dir"),
        (afile / "run", f"run_dir='{afile / 'run'}': cannot be created: {afile} is a file"),
        ("/proc/reft-run", "run_dir='/proc/reft-run': cannot be created in /proc: No such file or directory"),
    ]:
        proc = reft("sft", "--config", SFT_YAML, f"run_dir={run_dir}", *TINY, "epochs=1", "warmup_epoch=1")
        assert proc.returncode == 2
        assert last_line(proc) == f"reft sft: error: {message}"
    assert afile.read_text() == "keep me"


def test_an_error_after_the_run_dir_exists_names_the_log_with_the_details(tmp_path):
    """Once the run directory exists, the one line ends with the log's path; the log has what the
    line leaves out (the traceback) and everything the command printed. Before, no log."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    missing = ["data.dataset=svamp", f"data.data_dir={empty}", "data.download=false"]
    message = (f"reft sft: error: {empty}/reft/svamp_nl.json: missing and downloads are off; download "
               "https://raw.githubusercontent.com/")
    fresh = tmp_path / "fresh"  # the data is read before the run directory is made: no log
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={fresh}", *missing)
    assert proc.returncode == 2
    assert last_line(proc).startswith(message) and "(log: " not in proc.stderr, proc.stderr
    assert not fresh.exists()

    run = tmp_path / "run"
    run.mkdir()
    proc = reft("sft", "--config", SFT_YAML, f"run_dir={run}", *missing)
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith(message) and line.endswith(f" (log: {run / 'log.txt'})"), line
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    log = (run / "log.txt").read_text()
    assert log.startswith("=== ") and f"reft sft --config {SFT_YAML} run_dir={run} data.dataset=svamp" in log
    assert "Traceback (most recent call last):" in log and "reft_jax.data.formats.DataError: " in log
    assert log.endswith(line + "\n")
