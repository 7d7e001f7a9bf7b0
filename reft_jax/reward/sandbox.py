"""Program executor for P-CoT rewards: a persistent pool of sandbox workers behind a batch API.

    with ProgramExecutor(timeout=2.0) as ex:
        results = ex.run(programs)          # one ProgramResult per program, in order
        results[0].status, results[0].value  # "ok" | "error" | "timeout" | "rejected", float|None

Execution semantics are ReFT's (reference §3.2): truncate at the first blank line, `sys.exit` ->
`print`, `math` and `sympy` bound, `exec` with separate globals/locals, then `solution()`.
Containment is layered (see `sandbox_worker.py` for the per-program layers); this side adds:

* workers are fresh interpreters (`python -I` through subprocess's fork+exec, i.e. spawn, but
  without multiprocessing re-importing the caller's `__main__`, which may import JAX), so no
  running copy of the JAX process is ever made;
* a worker never runs untrusted code itself: it forks a confined grandchild per program, so a
  program cannot leave anything behind for the next one;
* a parent-side deadline per job: a worker that does not answer within timeout + grace is
  killed (its grandchild dies with it) and replaced; a worker that dies is replaced, and the
  job it was running is retried once;
* a result cache keyed by program text (every outcome but a lost worker is deterministic
  enough to keep, timeouts included), and duplicate programs in a batch run once.

Two kinds of worker: "light" ones (math + the allowed stdlib modules, forking costs ~0.5 ms on
an idle core) and "sympy" ones (sympy, mpmath and numpy imported and warmed up, forking costs
~2.5 ms), which run only programs whose text names one of those (everything, when configured
with no light workers). A grandchild cannot open files, so it cannot import a module its worker
has not loaded: a program that never names numpy or sympy cannot reach them and runs on a
light worker. Typical programs use neither, and this keeps their CPU cost per program at about a
third. What a program may use is `SandboxConfig.policy` ("reft" by default: what the official
executor runs, minus the escape routes; see the SandboxConfig docstring for what still differs).

Why this module is long: the executor service (worker pool, deadlines, replacement, retries,
cache, routing to light / sympy workers) and its policy setting form one state machine whose
invariants (a job is answered once, a dead worker's job retried once) span all of it.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from typing import Iterable, Literal, Sequence

from reft_jax.reward.sandbox_worker import (  # noqa: F401 - re-exported
    HEAVY_MODULES,
    NEVER_MODULES,
    POLICIES,
    REFT_MODULES,
    STRICT_MODULES,
    policy_modules,
    process_code,
    screen,
)

STATUSES = ("ok", "error", "timeout", "rejected")
_DEPTH = 2  # jobs queued per worker, so it never waits for this process between programs
_WORKER_FILE = pathlib.Path(__file__).with_name("sandbox_worker.py")


class SandboxError(RuntimeError):
    """The executor itself cannot work (workers fail to start), as opposed to a bad program."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Executor settings (a config section; the defaults suit training).

    `policy` decides what a program may use; the containment (a confined fork per program:
    audit hook refusing files, sockets, processes and signals; rlimits on CPU, memory, files and
    processes; uid nobody; wall-clock kill) is the same under both.

    * "reft" (default): what the official ReFT executor runs (§3.2 of the reference: a plain
      `exec` that may import anything installed), minus the escape routes. Imports from
      `allowed_modules`, by default `REFT_MODULES`: math, cmath, numpy, sympy, mpmath,
      fractions, decimal, numbers, itertools, functools, collections, statistics, operator,
      datetime, time, calendar, typing, string, re, random, heapq, bisect, copy. `eval` / `exec`
      of text (screened like the program, run with the sandbox's builtins), `getattr` /
      `setattr` / `delattr` (refusing the names the screen refuses), the harmless dunders
      (`__name__`, `__doc__`, `__class__`, `__init__`, operator methods such as `__add__`; see
      `sandbox_worker.HARMLESS_DUNDERS`). `time.sleep` runs (the wall-clock kill bounds it).
    * "strict": the narrower first screen: `STRICT_MODULES` (no numpy, time, calendar, typing),
      no eval / exec / getattr / setattr / delattr, no dunder at all.

    Still refused under "reft", where the official executor runs the program (reward 0, 0.1
    on MathQA, where ReFT may have scored it): imports outside `allowed_modules` (os, sys,
    subprocess, socket, ctypes, importlib, scipy, ...; `NEVER_MODULES` cannot be allowed);
    `open`, `compile`, `__import__`, `globals` / `locals` / `vars`, `input`, `exit`; private
    `_names` and the dunders that lead out (`__subclasses__`, `__globals__`, `__builtins__`,
    `__dict__`, `__self__`, `__code__`, `__traceback__`, ...); frame and code attributes
    (`gi_frame`, `f_back`, `tb_frame`, ...); eval / exec of code objects; any file, socket,
    process, thread or signal at run time; more than `memory_mb` or `timeout` seconds; a
    heavy module (numpy, sympy, mpmath) reached by a program whose text does not name it.
    """

    timeout: float = 2.0  # wall-clock seconds per program (ReFT main: 10, newer branch: 2)
    workers: int = 0  # light workers; 0 = the CPU cores this process may use
    sympy_workers: int = 1  # workers with sympy and numpy loaded, for programs naming them
    memory_mb: int = 1024  # address space a program may add to the worker's
    max_output: int = 4096  # stdout characters kept per program
    max_program_chars: int = 100_000  # longer programs are rejected unseen
    cache_size: int = 100_000  # results remembered (LRU, keyed by program text)
    screen: bool = True  # static AST screen (the other layers stay on regardless)
    grace: float = 3.0  # parent-side slack before a silent worker is killed
    policy: Literal["reft", "strict"] = "reft"  # see above; sandbox_worker.POLICIES
    allowed_modules: tuple[str, ...] | None = None  # top-level modules; None = the policy's list

    def validate(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.workers < 0 or self.sympy_workers < 0:
            raise ValueError("workers and sympy_workers must be >= 0")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in self.allowed_modules or ():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"allowed_modules: {name!r} is not a top-level module name")
            if name in NEVER_MODULES or name.startswith("_"):
                raise ValueError(f"allowed_modules: {name!r} gives access to files, processes or "
                                 "the interpreter and cannot be allowed")

    @property
    def modules(self) -> frozenset:
        """The modules programs may import under this config."""
        return policy_modules(self.policy, self.allowed_modules)


@dataclasses.dataclass(frozen=True)
class ProgramResult:
    """The outcome of one program. `value` is ReFT's floatify of the returned object (None when
    it is not a number); `text` is `str(result)` (ReFT's MathQA path); both None unless ok."""

    status: str
    value: float | None = None
    text: str | None = None
    detail: str = ""
    output: str = ""
    seconds: float = 0.0


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def uses_heavy(program: str, modules: Iterable[str] = REFT_MODULES) -> bool:
    """Whether a program may need sympy (bound in every program, as ReFT does) or another heavy
    module among `modules` (numpy, mpmath): only "sympy" workers have them loaded, and a
    grandchild cannot import anything new, so the name has to come from the program's text."""
    return any(name in program for name in HEAVY_MODULES.intersection(modules) | {"sympy"})


class _Worker:
    """Main-side handle of one worker process and the jobs queued on it (run in order)."""

    def __init__(self, kind: str, cfg: SandboxConfig):
        self.kind = kind
        spec = {"timeout": cfg.timeout, "memory_mb": cfg.memory_mb, "max_output": cfg.max_output,
                "screen": cfg.screen, "sympy": kind == "sympy", "policy": cfg.policy,
                "allowed": sorted(cfg.modules)}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER_FILE), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
        )
        self.out_fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.jobs: collections.deque[int] = collections.deque()  # batch-local indices, in order
        self.head_since = 0.0  # when the first queued job began (or could begin) running
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, job: int, code: str) -> None:
        """Queue a job on the worker; OSError (job not queued) when the worker is gone."""
        data = json.dumps({"id": job, "code": code}).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()
        if not self.jobs:
            self.head_since = time.monotonic()
        self.jobs.append(job)

    def finish_head(self) -> int:
        job = self.jobs.popleft()
        self.head_since = time.monotonic()
        return job

    def read_messages(self) -> list[dict] | None:
        """Messages available now; None when the worker has closed its end (it is dead)."""
        data = os.read(self.out_fd, 1 << 16)
        if not data:
            return None
        self.buf += data
        messages = []
        while len(self.buf) >= 4:
            n = struct.unpack(">I", self.buf[:4])[0]
            if len(self.buf) < 4 + n:
                break
            messages.append(json.loads(self.buf[4:4 + n].decode()))
            self.buf = self.buf[4 + n:]
        return messages

    def kill(self) -> None:
        """SIGKILL the worker; its grandchild dies with it (PR_SET_PDEATHSIG)."""
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _shutdown(workers: list[_Worker]) -> None:
    """Close workers politely (EOF makes them exit), then make sure."""
    for w in workers:
        try:
            w.proc.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


class ProgramExecutor:
    """Persistent sandbox pool with a batch API. Thread-safe (one batch at a time)."""

    def __init__(self, config: SandboxConfig | None = None, **overrides):
        cfg = dataclasses.replace(config or SandboxConfig(), **overrides)
        cfg.validate()
        self.config = cfg
        self._modules = cfg.modules
        self._n = {"light": cfg.workers or default_workers(), "sympy": cfg.sympy_workers}
        if self._n["sympy"] == 0:  # everything must be able to run somewhere
            self._n["light"], self._n["sympy"] = 0, self._n["light"]
        self._workers: list[_Worker] = []
        self._cache: collections.OrderedDict[str, ProgramResult] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._failed_starts = 0
        self._attempts: list[int] = []  # per job of the current batch: workers lost running it
        self.counts: collections.Counter = collections.Counter()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "ProgramExecutor":
        """Start missing workers (non-blocking; they report ready when their imports are done)."""
        for kind, n in self._n.items():
            have = sum(1 for w in self._workers if w.kind == kind)
            for _ in range(n - have):
                self._workers.append(_Worker(kind, self.config))
        return self

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "ProgramExecutor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self, kind: str | None = None) -> list[int]:
        """Pids of the workers ("light" / "sympy" / all)."""
        return [w.pid for w in self._workers if kind in (None, w.kind)]

    def stats(self) -> dict:
        """Counters since creation: statuses, cache hits, worker restarts, programs executed."""
        return dict(self.counts)

    # --- batch API ----------------------------------------------------------------------------

    def run_one(self, program: str) -> ProgramResult:
        return self.run([program])[0]

    def run(self, programs: Sequence[str]) -> list[ProgramResult]:
        """Execute a batch; returns one ProgramResult per input, in order."""
        with self._lock:
            results: list[ProgramResult | None] = [None] * len(programs)
            todo: dict[str, list[int]] = {}
            for i, program in enumerate(programs):
                early = self._precheck(program)
                if early is not None:
                    results[i] = early
                elif program in self._cache:
                    self._cache.move_to_end(program)
                    results[i] = self._cache[program]
                    self.counts["cache_hits"] += 1
                else:
                    todo.setdefault(program, []).append(i)
            unique = list(todo)
            for program, result in zip(unique, self._execute(unique)):
                if not result.detail.startswith(("sandbox worker", "no answer")):
                    self._remember(program, result)
                for i in todo[program]:
                    results[i] = result
            for r in results:
                self.counts[r.status] += 1
            return results  # type: ignore[return-value]

    def _precheck(self, program) -> ProgramResult | None:
        if not isinstance(program, str):
            return ProgramResult("rejected", detail=f"program is {type(program).__name__}, not str")
        if len(program) > self.config.max_program_chars:
            return ProgramResult("rejected", detail=f"program longer than {self.config.max_program_chars} chars")
        return None

    def _remember(self, program: str, result: ProgramResult) -> None:
        if self.config.cache_size <= 0:
            return
        self._cache[program] = result
        if len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def _execute(self, programs: list[str]) -> list[ProgramResult]:
        """The event loop: keep every worker `_DEPTH` jobs deep, collect results in order,
        replace workers that die or overrun timeout + grace on their current job."""
        if not programs:
            return []
        self.start()
        results: list[ProgramResult | None] = [None] * len(programs)
        queues = {"sympy": collections.deque(), "light": collections.deque()}
        for j, program in enumerate(programs):  # with no light workers, all go to sympy ones
            heavy = uses_heavy(program, self._modules) or self._n["light"] == 0
            queues["sympy" if heavy else "light"].append(j)
        pending = len(programs)
        self._attempts = [0] * len(programs)
        budget = self.config.timeout + self.config.grace
        while pending:
            for w in list(self._workers):
                queue = queues[w.kind]  # sympy workers fork 3-5x slower: they never take light jobs
                while w.ready and len(w.jobs) < _DEPTH and queue:
                    j = queue.popleft()
                    try:
                        w.send(j, programs[j])
                    except OSError:  # died since the last look: the job never reached it
                        queue.appendleft(j)
                        pending -= self._replace(w, results, queues, "sandbox worker died")
                        break
            now = time.monotonic()
            wait = min([w.head_since + budget - now for w in self._workers if w.jobs] + [0.5])
            fds = {w.out_fd: w for w in self._workers}
            readable, _, _ = select.select(list(fds), [], [], max(0.0, wait))
            for fd in readable:
                w = fds[fd]
                messages = w.read_messages()
                if messages is None:
                    pending -= self._replace(w, results, queues, "sandbox worker died")
                    continue
                for msg in messages:
                    pending -= self._handle(w, msg, results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.jobs and now > w.head_since + budget:
                    pending -= self._replace(w, results, queues, "no answer from the sandbox worker",
                                             status="timeout")
                elif not w.ready and now - w.started > 60:
                    self._replace(w, results, queues, "sandbox worker did not start")
        return results  # type: ignore[return-value]

    def _handle(self, w: _Worker, msg: dict, results: list) -> int:
        if msg.get("t") == "ready":
            w.ready = True
            self._failed_starts = 0
            return 0
        if msg.get("t") != "done" or not w.jobs or msg.get("id") != w.jobs[0]:
            return 0
        r = msg["r"]
        results[w.finish_head()] = ProgramResult(
            status=r["status"], value=r.get("value"), text=r.get("text"),
            detail=r.get("detail", ""), output=r.get("output", ""), seconds=r.get("seconds", 0.0))
        self.counts["executed"] += 1
        return 1

    def _replace(self, w: _Worker, results: list, queues: dict, detail: str, status: str = "error") -> int:
        """Kill a worker, start a new one, requeue the jobs it had not started. The job it was
        running fails, except that a job whose worker *died* (killed from outside: programs
        cannot signal it) is retried once. Returns how many jobs failed (0 or 1)."""
        failed = 0
        if w.jobs:
            head = w.jobs.popleft()
            self._attempts[head] += 1
            if status == "error" and self._attempts[head] < 2:
                w.jobs.appendleft(head)
            else:
                results[head] = ProgramResult(status, detail=detail, seconds=time.monotonic() - w.head_since)
                failed = 1
            queues[w.kind].extendleft(reversed(w.jobs))
        w.kill()
        self._workers.remove(w)
        self.counts["worker_restarts"] += 1
        if not w.ready:
            self._failed_starts += 1
            if self._failed_starts > 5:
                raise SandboxError("sandbox workers keep dying before they are ready; "
                                   f"try: {sys.executable} -I {_WORKER_FILE} '{{...}}'")
        self._workers.append(_Worker(w.kind, self.config))
        return failed


def run_programs(programs: Iterable[str], **config) -> list[ProgramResult]:
    """One-shot convenience: a pool for one batch (tests, scripts). Training keeps one executor."""
    with ProgramExecutor(**config) as ex:
        return ex.run(list(programs))
