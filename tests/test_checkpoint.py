"""Orbax checkpoints: exact round trip, retention, corrupt-checkpoint fallback, resharding."""
from __future__ import annotations

import gc
import json
import logging
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from reft_jax.checkpoint import (
    COMMIT_MARKER,
    CheckpointError,
    Checkpointer,
    CheckpointWarning,
    abstract_like,
    improves,
)


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def make_state(seed: int = 0, step: int = 0) -> TrainState:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": jax.random.normal(k1, (16, 8), jnp.float32),
        "emb": jax.random.normal(k2, (4, 8), jnp.bfloat16),
        "b": jnp.zeros((8,), jnp.float32),
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu / nu / count
    return TrainState(params, opt_state, jnp.int32(step), k3)


def leaf_bits(x) -> tuple:
    """A leaf as (dtype, shape, raw bytes); PRNG keys via their key data. Equal means bitwise."""
    dtype = str(x.dtype)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return dtype, x.shape, x.tobytes()


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert leaf_bits(x) == leaf_bits(y)


def step_dir(ckpt_dir: pathlib.Path, step: int) -> pathlib.Path:
    return ckpt_dir / str(step)


def save_steps(ckpt: Checkpointer, steps, metrics=None):
    for i, step in enumerate(steps):
        metric = None if metrics is None else metrics[i]
        ckpt.save(step, make_state(seed=step, step=step), {"epoch": step}, metric=metric)
    ckpt.wait()


def restored_step(result) -> int:
    state, meta = result
    assert meta["epoch"] == int(state.step)
    return int(state.step)


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_is_bitwise_with_meta(tmp_path):
    state = make_state(seed=3, step=7)
    meta = {"epoch": np.int64(2), "data": {"position": 123, "order_seed": 5},
            "best": np.float32(0.5), "config": {"optim": {"lr": 3e-7}, "tags": ("a", "b")}}
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(7, state, meta)
    assert (step_dir(tmp_path / "ck", 7) / COMMIT_MARKER).exists()

    fresh = Checkpointer(tmp_path / "ck")  # as after a restart
    assert fresh.all_steps() == [7] and fresh.latest_step() == 7
    restored, restored_meta = fresh.restore(abstract_like(state))
    assert_bitwise_equal(restored, state)
    assert restored.params["emb"].dtype == jnp.bfloat16
    assert json.loads(json.dumps(restored_meta)) == restored_meta
    assert restored_meta == {"epoch": 2, "data": {"position": 123, "order_seed": 5}, "best": 0.5,
                             "config": {"optim": {"lr": 3e-7}, "tags": ["a", "b"]}}


def test_missing_directory_restores_none(tmp_path):
    ckpt = Checkpointer(tmp_path / "never_written")
    assert ckpt.restore(abstract_like(make_state())) is None
    assert ckpt.all_steps() == [] and ckpt.latest_step() is None and ckpt.best_step() is None


def test_meta_must_be_json(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    with pytest.raises(TypeError, match="meta"):
        ckpt.save(1, make_state(), {"bad": object()})
    assert ckpt.all_steps() == []


def test_saving_an_existing_step_is_an_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    save_steps(ckpt, [1, 2])
    with pytest.raises(CheckpointError, match="step 2"):
        ckpt.save(2, make_state(), {})
    with pytest.raises(CheckpointError, match="step 1"):
        ckpt.save(1, make_state(), {})


# --- retention --------------------------------------------------------------------------------


def test_keep_latest_n_plus_best(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2, best_metric="eval/acc", best_mode="max")
    save_steps(ckpt, [1, 2, 3, 4, 5], metrics=[0.5, 0.9, 0.1, 0.2, 0.3])
    assert ckpt.all_steps() == [2, 4, 5]  # latest two + the best, outside the latest two
    assert ckpt.best_step() == 2
    assert restored_step(ckpt.restore_best(abstract_like(make_state()))) == 2
    assert restored_step(ckpt.restore(abstract_like(make_state()))) == 5


def test_best_mode_min_and_without_keep_best(tmp_path):
    ckpt = Checkpointer(tmp_path / "a", keep=2, best_metric="loss", best_mode="min")
    save_steps(ckpt, [1, 2, 3, 4], metrics=[0.1, 0.5, 0.4, 0.3])
    assert ckpt.all_steps() == [1, 3, 4] and ckpt.best_step() == 1

    ckpt = Checkpointer(tmp_path / "b", keep=2, best_metric="loss", best_mode="min", keep_best=False)
    save_steps(ckpt, [1, 2, 3, 4], metrics=[0.1, 0.5, 0.4, 0.3])
    assert ckpt.all_steps() == [3, 4] and ckpt.best_step() == 4


def test_ties_keep_the_newer_step_as_the_trainers_record_it(tmp_path):
    """A tie for best keeps the newer step on disk; the trainers' own `best` record (which
    `reft eval --step best` falls back on) must name that same step, not a deleted one."""
    ckpt = Checkpointer(tmp_path / "ck", keep=1, best_metric="acc", best_mode="max")
    metrics = [0.025, 0.035, 0.035]
    save_steps(ckpt, [94, 188, 282], metrics=metrics)
    best = None
    for step, value in zip([94, 188, 282], metrics):
        if best is None or improves(value, best[0]):
            best = (value, step)
    assert ckpt.all_steps() == [282] and ckpt.best_step() == 282 == best[1]
    assert improves(0.5, 0.4) and not improves(0.4, 0.5)
    assert improves(0.3, 0.4, mode="min") and improves(0.4, 0.4, mode="min")
    assert not improves(float("nan"), 0.1)


# --- damaged checkpoints ----------------------------------------------------------------------


def truncate_arrays(path: pathlib.Path):
    files = [f for f in path.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, f"no array data files under {path}"
    for f in files:
        with open(f, "r+b") as handle:
            handle.truncate(max(1, f.stat().st_size // 3))


def damage_marker(path: pathlib.Path):
    (path / COMMIT_MARKER).unlink()


def damage_meta(path: pathlib.Path):
    (path / "meta" / "metadata").write_text('{"epoch": 3, "data": {"posi')


@pytest.mark.parametrize("damage, reason", [
    (truncate_arrays, "state"), (damage_marker, COMMIT_MARKER), (damage_meta, "meta"),
])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage, reason):
    ckpt_dir = tmp_path / "ck"
    save_steps(Checkpointer(ckpt_dir, keep=5), [1, 2, 3])
    damage(step_dir(ckpt_dir, 3))

    ckpt = Checkpointer(ckpt_dir, keep=5)
    with pytest.warns(CheckpointWarning, match="step 3") as caught:
        result = ckpt.restore(abstract_like(make_state()))
    assert restored_step(result) == 2
    assert reason in str(caught[0].message)
    assert_bitwise_equal(result[0], make_state(seed=2, step=2))

    # The unusable step is moved aside so training can save step 3 again.
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, make_state(seed=3, step=3), {"epoch": 3})
    ckpt.wait()
    assert restored_step(Checkpointer(ckpt_dir).restore(abstract_like(make_state()))) == 3


def test_every_step_damaged_is_an_error_not_a_fresh_start(tmp_path):
    ckpt_dir = tmp_path / "ck"
    save_steps(Checkpointer(ckpt_dir), [1, 2])
    for step in (1, 2):
        truncate_arrays(step_dir(ckpt_dir, step))
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no usable"):
        Checkpointer(ckpt_dir).restore(abstract_like(make_state()))


def test_explicit_damaged_step_raises(tmp_path):
    ckpt_dir = tmp_path / "ck"
    save_steps(Checkpointer(ckpt_dir), [1, 2])
    damage_meta(step_dir(ckpt_dir, 2))
    with pytest.raises(CheckpointError, match=r"^checkpoint step 2 in .* is unusable: meta unreadable"):
        Checkpointer(ckpt_dir).restore(abstract_like(make_state()), step=2)
    assert restored_step(Checkpointer(ckpt_dir).restore(abstract_like(make_state()), step=1)) == 1
    with pytest.raises(CheckpointError, match="no checkpoint step 9"):
        Checkpointer(ckpt_dir).restore(abstract_like(make_state()), step=9)


def zero_arrays(path: pathlib.Path):
    """Every array data file of a step overwritten with zeros (same size)."""
    for f in (f for f in path.rglob("*") if f.is_file() and f.parent.name == "d"):
        f.write_bytes(bytes(f.stat().st_size))


@pytest.mark.parametrize("damage", [truncate_arrays, zero_arrays, damage_meta])
def test_reader_latest_falls_back_and_leaves_the_run_alone(tmp_path, damage):
    """restore_selected (reft eval, reft sample): latest = the newest usable step, with a
    warning; nothing in the run directory moves; an explicit damaged step is an error."""
    ckpt_dir = tmp_path / "ck"
    save_steps(Checkpointer(ckpt_dir), [1, 2, 3])
    damage(step_dir(ckpt_dir, 3))
    before = sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*"))
    with pytest.warns(CheckpointWarning, match="using step 2, the newest usable"):
        assert restored_step(Checkpointer(ckpt_dir).restore_selected(abstract_like(make_state()), "latest")) == 2
    assert sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*")) == before
    assert restored_step(Checkpointer(ckpt_dir).restore_selected(abstract_like(make_state()), "1")) == 1
    with pytest.raises(CheckpointError, match=r"^checkpoint step 3 in .* is unusable: "):
        Checkpointer(ckpt_dir).restore_selected(abstract_like(make_state()), "3")


@pytest.mark.parametrize("damage", [truncate_arrays, zero_arrays])
def test_failed_read_finishes_its_other_reads_before_the_loop_closes(tmp_path, monkeypatch, caplog, damage):
    """A damaged step fails one array's read while the others are in flight. Those finish before
    Orbax's event loop closes: none reports 'Event loop is closed' from a TensorStore thread (via
    sys.unraisablehook, as a stderr traceback in the CLI) and asyncio logs no unretrieved error.
    Many arrays, so the step spans several data files: with a handful, every read fails at the
    same instant and the race never shows."""
    stray = []
    monkeypatch.setattr(sys, "unraisablehook", stray.append)

    def many(seed):
        return {f"w{i:02d}": jnp.full((4096,), seed + i, jnp.float32) for i in range(64)}

    ckpt_dir = tmp_path / "ck"
    with Checkpointer(ckpt_dir, keep=5) as ckpt:
        for step in (1, 2):
            ckpt.save(step, many(step), {"epoch": step})
    damage(step_dir(ckpt_dir, 2))
    for _ in range(4):  # the race is lost only some of the time
        with pytest.warns(CheckpointWarning) as caught:
            state, meta = Checkpointer(ckpt_dir).restore_selected(abstract_like(many(0)), "latest")
        assert "using step 1, the newest usable" in str(caught[-1].message)
        assert meta == {"epoch": 1} and float(state["w63"][0]) == 64.0
    time.sleep(0.5)  # reads left running would report by now
    gc.collect()  # unretrieved task errors are logged when the tasks are collected
    assert [repr(u.exc_value) for u in stray] == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_check_run_dir(tmp_path):
    from reft_jax.checkpoint import check_run_dir
    from reft_jax.config import ConfigError

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        str(afile): f"run_dir='{afile}': is a file, not a directory; choose another run_dir",
        str(afile / "run"): f"run_dir='{afile / 'run'}': cannot be created: {afile} is a file",
        "/proc/reft-run": "run_dir='/proc/reft-run': cannot be created in /proc: No such file or directory",
        "/proc/self": "run_dir='/proc/self': is not writable: No such file or directory",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError) as info:
            check_run_dir(path)
        assert str(info.value) == message
    assert afile.read_text() == "x"
    check_run_dir(tmp_path / "new" / "run")  # created, writable, left empty
    assert list((tmp_path / "new" / "run").iterdir()) == []


# --- sharding ---------------------------------------------------------------------------------


def test_restore_reshards_onto_another_mesh(tmp_path):
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest should fake 8 CPU devices"
    auto = (jax.sharding.AxisType.Auto,)
    save_mesh = Mesh(devices.reshape(8), ("data",), axis_types=auto)
    load_mesh = Mesh(devices.reshape(4, 2), ("fsdp", "tensor"), axis_types=auto * 2)

    tree = {"w": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8),
            "v": jnp.arange(32, dtype=jnp.int32)}
    saved = jax.device_put(tree, {"w": NamedSharding(save_mesh, P("data")),
                                  "v": NamedSharding(save_mesh, P("data"))})
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(1, saved, {"mesh": "data=8"})

    target = {"w": NamedSharding(load_mesh, P("fsdp", "tensor")), "v": NamedSharding(load_mesh, P())}
    abstract = abstract_like(tree, target)
    assert abstract["w"].sharding == target["w"]
    restored, meta = Checkpointer(tmp_path / "ck").restore(abstract)
    assert meta == {"mesh": "data=8"}
    for key in tree:
        assert restored[key].sharding == target[key]
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(tree[key]))


def test_abstract_like_single_sharding_and_scalars():
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    abstract = abstract_like(make_state(), replicated)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding == replicated for x in leaves)
    plain = abstract_like({"a": np.zeros((2, 3), np.float16), "n": 3})
    assert plain["a"].shape == (2, 3) and plain["a"].dtype == np.float16
    assert plain["n"].shape == ()


def test_a_save_without_a_metric_logs_no_orbax_notice(tmp_path, caplog):
    """A step saved without evaluation is kept as a latest step; Orbax's 'did not provide
    metrics' notice for it is noise in every run's output."""
    caplog.set_level(logging.INFO)
    with Checkpointer(tmp_path / "c", keep=2, best_metric="acc") as ck:
        ck.save(1, {"x": np.ones(3, np.float32)}, {})
        ck.save(2, {"x": np.ones(3, np.float32)}, {}, metric=0.5)
        ck.wait()
        assert ck.all_steps() == [1, 2]
    assert not [r for r in caplog.records if "did not provide metrics" in r.getMessage()]
