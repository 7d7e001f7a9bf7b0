"""Metrics: JSONL + TensorBoard scalars, PNG curves, progress bars, step timing."""
from __future__ import annotations

import json
import math
import pathlib
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from reft_jax.metrics import MetricsWriter, Timer, plot_metrics, progress, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_tb_scalars(tb_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Parse TFRecord-framed event files (u64 length, u32 crc, payload, u32 crc) with
    tensorboardX's own protobuf classes: no tensorboard install needed."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(tb_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {tb_dir}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            payload = data[offset + 12: offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_lines_are_flushed_and_typed(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    record = writer.write(0, {"loss": jnp.float32(1.5), "acc": np.float64(0.25), "n": np.int32(3),
                              "flag": True, "nan": float("nan")}, prefix="train")
    assert record["train/loss"] == 1.5 and record["step"] == 0
    # visible before close: a crash loses nothing already written
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    writer.write(5, {"acc": 0.5}, prefix="eval/")
    writer.close()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 5]
    first = rows[0]
    assert first["train/loss"] == 1.5 and first["train/acc"] == 0.25
    assert first["train/n"] == 3 and isinstance(first["train/n"], int)
    assert first["train/flag"] == 1
    assert math.isnan(first["train/nan"])  # recorded; deciding about NaN is the trainer's job
    assert isinstance(first["time"], float) and abs(first["time"] - time.time()) < 60
    assert rows[1] == {"step": 5, "time": rows[1]["time"], "eval/acc": 0.5}


def test_appends_across_writers_and_skips_a_torn_last_line(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.write(1, {"a": 1.0})
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:  # resumed run
        writer.write(2, {"a": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "a": ')  # killed mid-line
    with pytest.warns(UserWarning, match="line 3"):
        rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["a"] for r in rows] == [1.0, 2.0]


def test_tensorboard_scalars(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as writer:
        for step in range(3):
            writer.write(step, {"loss": 1.0 / (step + 1), "reward": jnp.float32(step)}, prefix="train")
    scalars = read_tb_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert scalars["train/reward"] == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", enabled=False) as writer:
        writer.write(0, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_bad_values_are_rejected_with_the_key(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="train/vec"):
            writer.write(0, {"vec": np.zeros(3)}, prefix="train")
        with pytest.raises(TypeError, match="name"):
            writer.write(0, {"name": "abc"})
        with pytest.raises(ValueError, match="step"):
            writer.write(0, {"step": 3})


def test_plots_are_pngs_grouped_by_prefix(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        for step in range(30):
            writer.write(step, {"loss": 2.0 / (step + 1), "reward": step / 30, "kl": 0.01 * step},
                         prefix="train")
            writer.write(step, {"tokens_per_s": 1000.0 + step})
            if step % 5 == 0:
                writer.write(step, {"accuracy": step / 60}, prefix="eval")
        writer.write(10, {"loss": 0.1}, prefix="train")  # a resumed run re-logs step 10
    paths = plot_metrics(tmp_path)
    assert sorted(p.name for p in paths) == ["eval.png", "other.png", "train.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
        assert path.parent == tmp_path / "plots"
    only = plot_metrics(tmp_path, keys=["eval/*"], out_dir=tmp_path / "sel")
    assert [p.name for p in only] == ["eval.png"]


def test_plot_with_no_metrics_is_empty(tmp_path):
    assert plot_metrics(tmp_path) == []


def test_progress_iterates_and_can_be_disabled():
    assert list(progress(range(4), total=4, desc="x", unit="q")) == [0, 1, 2, 3]
    bar = progress(total=3, desc="manual", disable=True)
    bar.update(3)
    bar.close()


def test_timer_accumulates_and_blocks_when_asked():
    timer = Timer()
    for _ in range(2):
        with timer("sleep"):
            time.sleep(0.01)
    with timer("device") as span:
        out = span.block(jnp.ones((64, 64)) @ jnp.ones((64, 64)))
    assert float(out[0, 0]) == 64.0
    summary = timer.summary(prefix="time/")
    assert set(summary) == {"time/sleep", "time/device"}
    assert summary["time/sleep"] >= 0.02 and summary["time/device"] >= 0.0
    assert timer.summary(reset=True)["sleep"] >= 0.02
    assert timer.summary() == {}


def test_timer_records_time_even_when_the_body_raises():
    timer = Timer()
    with pytest.raises(RuntimeError):
        with timer("boom"):
            raise RuntimeError("x")
    assert "boom" in timer.summary()


def test_metrics_roundtrip_json_is_plain(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.write(1, {"x": jnp.array([2.5])})  # size-1 arrays are scalars too
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line)["x"] == 2.5


def test_progress_bars_honour_tqdm_disable(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with progress(total=3) as bar:
        assert bar.disable
    monkeypatch.setenv("TQDM_DISABLE", "")
    with progress(total=3) as bar:
        assert not bar.disable
