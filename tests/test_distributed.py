"""Multi-process runs: start-up logic, batch slices, split / gather, 2 processes x 4 devices ==
1 process x 8 devices, and resuming a checkpoint on another mesh shape."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _multiprocess_worker as worker
from reft_jax import distributed, parallel
from reft_jax.checkpoint import Checkpointer
from reft_jax.train import run as common
from reft_jax.train.state import make_optimizer

WORKER = pathlib.Path(worker.__file__)
REPO = WORKER.parent.parent
TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------
# start-up decisions (pure: environment passed in)
# ---------------------------------------------------------------------------------------------
SLURM = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]",
         "SLURM_NTASKS": "2"}


def test_config_wins_over_environment_and_environment_fills_the_rest():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    r = distributed.resolve(distributed.DistributedConfig(process_id=2), env)
    assert (r.coordinator_address, r.num_processes, r.process_id, r.local_device_ids) == \
        ("10.0.0.1:1234", 4, 2, [0, 1])
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.resolve(None, {"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="process_id"):
        distributed.DistributedConfig(num_processes=2, process_id=2)


@pytest.mark.parametrize("cfg, env, expected", [
    ({}, {}, "single"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "explicit"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, {}, "explicit"),
    ({"num_processes": 1}, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "single"),
    ({}, SLURM, "auto"),
    ({}, {**SLURM, "SLURM_NTASKS": "1"}, "single"),  # a one-task allocation is one process
    ({}, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "auto"),
    ({}, {"TPU_WORKER_HOSTNAMES": "t0"}, "single"),
    ({"auto": True}, {}, "auto"),  # Cloud TPU VM pod slices: JAX asks the metadata server
    ({"auto": False}, SLURM, "single"),
    ({}, {"REFT_DISTRIBUTED_AUTO": "1"}, "auto"),
    ({}, {**SLURM, "REFT_DISTRIBUTED_AUTO": "0"}, "single"),
    ({}, {"JAX_NUM_PROCESSES": "4"}, "auto"),  # JAX finds the coordinator and this process's id
])
def test_plan(cfg, env, expected):
    assert distributed.plan(distributed.DistributedConfig(**cfg), env) == expected


def test_single_process_is_a_no_op_everywhere():
    assert distributed.initialize() is False and not jax.distributed.is_initialized()
    assert distributed.is_primary()
    items = list(range(5))
    assert distributed.split_for_process(items) == items
    assert distributed.gather_from_processes(["a", 1]) == ["a", 1]
    np.testing.assert_array_equal(distributed.gather_from_processes(np.arange(3)), np.arange(3))
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    assert distributed.process_batch_slice(8, mesh) == slice(0, 8) == distributed.process_batch_slice(8)
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    g = parallel.shard_batch({"x": x}, mesh)["x"]
    assert g.sharding == parallel.batch_sharding(mesh, 2)
    np.testing.assert_array_equal(np.asarray(g), x)


def test_initialize_after_the_backend_started_says_so():
    jax.devices()  # this test process has long started its backend
    with pytest.raises(RuntimeError, match="must run before any JAX"):
        distributed.initialize(distributed.DistributedConfig(coordinator_address="127.0.0.1:1",
                                                             num_processes=2, process_id=0))


@pytest.mark.parametrize("n, parts", [(0, 2), (1, 3), (7, 2), (8, 4), (11, 3)])
def test_split_bounds_cover_items_in_order(n, parts):
    bounds = [distributed.split_bounds(n, parts, p) for p in range(parts)]
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------
# 2 processes x 4 devices == 1 process x 8 devices
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: pathlib.Path, num_processes: int, devices_each: int, port: int) -> list[tuple]:
    """Start the worker processes (fresh interpreters); their output goes to log files."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in range(num_processes):
        log = open(out / f"log{pid}.txt", "w")
        job = {"coordinator": f"127.0.0.1:{port}", "num-processes": num_processes, "process-id": pid}
        cmd = [sys.executable, str(WORKER), "--out", str(out)]
        if pid == 0:  # process 0 by flags, the others by our JAX_* environment fallback
            cmd += [a for k, v in job.items() for a in (f"--{k}", str(v))]
            penv = env
        else:
            penv = {**env, "JAX_COORDINATOR_ADDRESS": job["coordinator"],
                    "JAX_NUM_PROCESSES": str(num_processes), "JAX_PROCESS_ID": str(pid)}
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=log, stderr=subprocess.STDOUT), log,
                      out / f"log{pid}.txt"))
    return procs


def _stop(procs: list[tuple]) -> None:
    for proc, log, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _wait_all(procs: list[tuple], deadline: float) -> None:
    """Wait for every worker; as soon as one fails (its peers would hang in a collective) or
    the deadline passes, kill them all and show their logs."""
    failed = None
    try:
        while failed is None and any(p.poll() is None for p, _, _ in procs):
            bad = [(path, p.returncode) for p, _, path in procs if p.poll() not in (None, 0)]
            if bad:
                failed = f"{bad[0][0].name}: exit code {bad[0][1]}"
            elif time.monotonic() > deadline:
                failed = f"still running after {TIMEOUT_S} s"
            else:
                time.sleep(0.2)
        bad = [(path, p.returncode) for p, _, path in procs if p.poll() not in (None, 0)]
        if failed is None and bad:
            failed = f"{bad[0][0].name}: exit code {bad[0][1]}"
    finally:
        _stop(procs)
    if failed:
        tails = "\n".join(f"--- {p.name} (last lines) ---\n" + "\n".join(p.read_text().splitlines()[-25:])
                          for _, _, p in procs)
        pytest.fail(f"worker failed: {failed}\n{tails}")


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    deadline = time.monotonic() + TIMEOUT_S
    procs = _launch(tmp_path, 2, 4, _free_port())
    try:  # the 1 x 8 baseline, here, while the 2 x 4 job runs
        state, losses = worker.train(parallel.make_mesh(worker.MESH))
        base = worker.host_params(state)
    except BaseException:
        _stop(procs)
        raise
    _wait_all(procs, deadline)

    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    words = [f"W{i}" for i in range(11)]
    for i, r in enumerate(reports):
        assert (r["process"], r["local_devices"], r["devices"]) == (i, 4, 8)
        assert r["gathered_words"] == words  # split 6 / 5, gathered in order on every process
        assert len(r["gathered_rows"]) == 11 and r["gathered_rows"][6][0] == 100.0
        assert r["batch_slice"] == [4 * i, 4 * i + 4]
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-6)

    two = np.load(tmp_path / "params.npz")
    assert sorted(two) == sorted(base)
    diff = max(float(np.max(np.abs(two[k] - base[k]))) for k in base)
    print(f"max |params(2x4) - params(1x8)| = {diff:.3g}")
    assert diff <= 1e-6

    # The 2-process checkpoint (each process wrote its shards) restores here on another mesh.
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        state, meta = ckpt.restore(common.state_abstract(worker.CFG, worker.OPTIM, 100, mesh))
    assert meta["losses"] == reports[0]["losses"]
    restored = worker.host_params(state)
    assert max(float(np.max(np.abs(restored[k] - two[k]))) for k in two) == 0.0


# ---------------------------------------------------------------------------------------------
# Resume on another mesh shape
# ---------------------------------------------------------------------------------------------
def test_resume_on_another_mesh_continues_exactly(tmp_path):
    """Save after 2 SFT steps on data=8, restore onto (data=1, fsdp=4, tensor=2), 3 more steps:
    the same params as 5 uninterrupted steps on data=8."""
    before, after = 2, 3
    mesh_a = parallel.make_mesh(parallel.MeshConfig(data=8, fsdp=1, tensor=1))
    mesh_b = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    state, _ = worker.run_sft(worker.init_state(mesh_a, make_optimizer(worker.OPTIM, 100)), mesh_a,
                              range(before))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(before, state, {"next_batch": before})
        ckpt.wait()
    straight = worker.host_params(worker.run_sft(state, mesh_a, range(before, before + after))[0])

    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored, meta = ckpt.restore(common.state_abstract(worker.CFG, worker.OPTIM, 100, mesh_b))
    assert restored.params["embed"]["embedding"].sharding.mesh == mesh_b and int(restored.step) == before
    resumed, _ = worker.run_sft(restored, mesh_b, range(meta["next_batch"], before + after))
    assert int(resumed.step) == before + after
    diff = max(float(np.max(np.abs(straight[k] - v))) for k, v in worker.host_params(resumed).items())
    print(f"max |params(resumed on 1x4x2) - params(uninterrupted on 8x1x1)| = {diff:.3g}")
    assert diff <= 1e-6
