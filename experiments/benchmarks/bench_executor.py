"""Programs per second of our sandbox executor against the official ReFT executor.

The baseline is `src/python_engine.py` of lqtrung1998/mwp_ReFT as the reference describes it
(§3.2): per call, a fresh pebble `ProcessPool(max_workers=8)`, each program scheduled with a
timeout, `process_code` (prepend `import math` / `import sympy`, `sys.exit` -> `print`, stop at
the first blank line), `exec` with separate globals/locals, then `solution()`. Both run the same
SVAMP P-CoT programs in the same batches, in one process, one after the other; our result cache
is off so that both really execute every program.

    .venv/bin/python experiments/benchmarks/bench_executor.py [--batch-sizes 4,32] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import math  # noqa: F401 - the official engine has these imported in its (forked) workers
import os
import pathlib
import resource
import sys
import time

import sympy  # noqa: F401

from reft_jax.reward.sandbox import ProgramExecutor, process_code


def official_process_code(code: str) -> str:
    """The official `process_code`: ours (same truncation and `sys.exit` rewrite) plus the two
    import lines it prepends (our workers bind math and sympy directly instead)."""
    return "import math\nimport sympy\n" + process_code(code)


def official_run(code: str):
    g = {"math": math, "sympy": sympy}
    loc: dict = {}
    exec(code, g, loc)
    return eval("solution()", g, loc)


def official_batch(programs: list[str], timeout: float) -> list:
    from concurrent.futures import TimeoutError  # noqa: F401 - as in the official engine

    from pebble import ProcessPool

    results = []
    with ProcessPool(max_workers=8) as pool:
        futures = [pool.schedule(official_run, args=[official_process_code(p)], timeout=timeout)
                   for p in programs]
        for f in futures:
            try:
                res = f.result()
            except Exception:  # noqa: BLE001 - the official code prints and returns None
                res = None
            results.append(res)
    return results


def _floatify(x):
    try:
        return float(x)
    except Exception:  # noqa: BLE001
        return None


def _correct(values, golds) -> int:
    return sum(v is not None and abs(v - g) <= 1e-2 for v, g in zip(values, golds))


def _cpu_self_and_children() -> float:
    """CPU seconds of this process plus all reaped descendants (pebble's workers, per batch)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds of live processes and their reaped children (our workers and grandchildren)."""
    ticks = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _measure(programs, golds, batch_size, timeout):
    """{ours, pebble} -> (programs per wall second, CPU ms per program, correct answers)."""
    batches = [programs[i:i + batch_size] for i in range(0, len(programs), batch_size)]
    out = {}
    ex = ProgramExecutor(timeout=timeout, cache_size=0).start()
    ex.run(["def solution():\n    return 1"])  # wait until the workers are ready (once per run)
    cpu0, pids = _cpu_self_and_children(), ex.worker_pids()
    workers0, t0 = _cpu_of(pids), time.perf_counter()
    values = [r.value for b in batches for r in ex.run(b)]
    wall = time.perf_counter() - t0
    cpu = _cpu_self_and_children() - cpu0 + _cpu_of(pids) - workers0
    assert ex.worker_pids() == pids  # no restarts, so the accounting covers everything
    ex.close()
    out["ours"] = (len(programs) / wall, 1e3 * cpu / len(programs), _correct(values, golds))
    cpu0, t0 = _cpu_self_and_children(), time.perf_counter()
    values = [_floatify(r) for b in batches for r in official_batch(b, timeout)]
    wall = time.perf_counter() - t0
    cpu = _cpu_self_and_children() - cpu0
    out["pebble"] = (len(programs) / wall, 1e3 * cpu / len(programs), _correct(values, golds))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="svamp_python_sdp.json (default: $REFT_DATA_DIR/reft/...)")
    ap.add_argument("--batch-sizes", default="4,32",
                    help="programs per call, comma-separated (ReFT: 4 per GPU per step; 32 per step)")
    ap.add_argument("--limit", type=int, default=1000, help="use the first N programs (0: all 3,043)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-program timeout (official: 10 s)")
    args = ap.parse_args()

    path = pathlib.Path(args.data or pathlib.Path(os.environ.get("REFT_DATA_DIR", "../shared/data"))
                        / "reft" / "svamp_python_sdp.json")
    rows = json.loads(path.read_text())
    rows = rows[: args.limit] if args.limit else rows
    programs = [r["answer_cot"] for r in rows]
    golds = [float(r["answer_value"]) for r in rows]
    print(f"{len(programs)} SVAMP programs from {path}; {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}")
    print("ours: persistent pool (cores light workers + 1 sympy worker), fork per program, cache off")
    print("pebble: ProcessPool(max_workers=8) created per batch, as the official run_python_code")
    print("wall: programs per second (shared machine: depends on its load); CPU: CPU-milliseconds per"
          " program, all processes involved (steadier under load)")
    for size in (int(x) for x in args.batch_sizes.split(",")):
        m = _measure(programs, golds, size, args.timeout)
        for name in ("ours", "pebble"):
            rate, cpu, ok = m[name]
            print(f"batch {size:3d} {name:6s}: {rate:7.1f} programs/s, {cpu:5.2f} CPU-ms/program, "
                  f"correct {ok}/{len(programs)}")
        print(f"batch {size:3d} ratio ours/pebble: {m['ours'][0] / m['pebble'][0]:.2f}x programs/s, "
              f"{m['pebble'][1] / m['ours'][1]:.2f}x less CPU per program")
    return 0


if __name__ == "__main__":
    sys.exit(main())
