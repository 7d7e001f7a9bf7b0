"""Sandbox worker: a clean interpreter that runs each model-written program in a fresh forked
grandchild. Standalone on purpose (stdlib only, no reft_jax imports): `sandbox.py` starts it as
`python -I sandbox_worker.py CONFIG_JSON`, so it never inherits the trainer's `__main__` (which
may have imported JAX) the way multiprocessing's spawn/forkserver re-import it.

Why a fork per program: after untrusted code has run, an interpreter may be tampered with (patched
builtins, monkey-patched sympy, a leaked thread). The worker itself only imports trusted modules,
reads jobs, parses, screens and compiles them (never runs them; a parse that crashes or hangs
costs only this worker, which the parent replaces) and forks; every program runs in a disposable
grandchild that is confined before the program's first byte runs:

  SIGKILL when the worker dies (PR_SET_PDEATHSIG); its own process group; fds 0-2 on /dev/null
  and only the result pipe left open; cwd a private temp dir; uid nobody when running as root;
  rlimits CPU, AS, FSIZE=0, NOFILE=4 (no new file or socket at all), NPROC=0 (no new process or
  thread), CORE=0; an empty environment; an audit hook refusing files, sockets, processes,
  signals, ctypes and introspection; restricted builtins with an import allow-list; bounded
  stdout. sympy-only lazy imports are done in the worker first (`_warm_sympy`), since the
  grandchild cannot read files.

The worker kills the grandchild's whole process group at the wall-clock deadline.

Protocol on stdin/stdout: frames of a 4-byte big-endian length and a UTF-8 JSON object.
  main -> worker: {"id": int, "code": str}
  worker -> main: {"t": "ready", "pid": int} once, then per job, in order,
                  {"t": "done", "id", "r": {status, value, text, detail, output, seconds}}.
  grandchild -> worker: one frame, the result, on its own pipe.
"""
from __future__ import annotations

import ast
import builtins
import json
import os
import resource
import select
import signal
import struct
import sys
import time

# Modules a program may import (top-level package names). All are preloaded in the worker so an
# import inside the sandbox never touches the filesystem (the grandchild cannot open files).
ALLOWED_MODULES = frozenset({
    "math", "cmath", "sympy", "mpmath", "fractions", "decimal", "numbers", "itertools",
    "functools", "collections", "statistics", "operator", "datetime", "string", "re", "random",
    "heapq", "bisect", "copy",
})
_PRELOAD = sorted(ALLOWED_MODULES - {"sympy", "mpmath"})

# Builtins a program never needs and an escape usually does.
BANNED_NAMES = frozenset({
    "eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "getattr",
    "setattr", "delattr", "input", "breakpoint", "help", "memoryview", "exit", "quit",
    "copyright", "credits", "license", "__builtins__", "__loader__", "__spec__",
})

# Audit events refused inside the grandchild (exact names, then prefixes). Allowed on purpose:
# `exec`/`compile` (sympy generates code), `object.__getattr__` (multipledispatch reads
# `__code__`), `sys._getframe` (lambdify/nsolve). Writing a function's code, defaults or globals
# is refused, so nothing can rewrite the audit hook itself.
_DENY_EXACT = frozenset({"open", "builtins.input", "builtins.breakpoint", "setopencookie", "time.sleep"})
_DENY_PREFIX = (
    "os.", "subprocess.", "socket.", "shutil.", "ctypes.", "_thread.", "signal.", "sys.",
    "pty.", "fcntl.", "mmap.", "resource.", "syslog.", "gc.", "marshal.", "pickle.", "urllib.",
    "http.", "ftplib.", "smtplib.", "telnetlib.", "poplib.", "imaplib.", "nntplib.", "sqlite3.",
    "webbrowser.", "winreg.", "msvcrt.", "cpython.", "_posixsubprocess.", "tempfile.", "glob.",
    "shelve.", "dbm.", "_winapi.", "ensurepip.", "code.", "function.",
)
_ALLOW_EXACT = frozenset({"sys._getframe", "object.__getattr__"})
_GUARDED_ATTRS = frozenset({
    "__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__", "__class__",
    "__bases__", "__dict__", "__builtins__",
})

MAX_RESULT_BYTES = 1 << 16  # what the worker reads from a grandchild
MAX_TEXT = 1000  # str(result) kept
MAX_DETAIL = 300


# --- ReFT execution semantics (pure; imported by sandbox.py too) --------------------------------


def process_code(code: str) -> str:
    """ReFT's `process_code` minus the two import lines (math and sympy are bound directly):
    `sys.exit` -> `print`; keep a `def solution` line always; stop at the first blank line."""
    code = code.replace("sys.exit", "print")
    kept = []
    for line in code.split("\n"):
        if line.startswith("def solution"):
            kept.append(line)
            continue
        if line.strip() == "":
            break
        kept.append(line)
    return "\n".join(kept)


def screen(code: str) -> str | None:
    """Static AST screen; returns why the program is rejected, or None. Unparsable code passes
    (it fails as a SyntaxError at exec, an `error` like in ReFT)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return screen_tree(tree)


def screen_tree(tree: ast.AST) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in ALLOWED_MODULES:
                    return f"import of {alias.name!r}"
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] not in ALLOWED_MODULES:
                return f"import from {node.module!r}"
        elif isinstance(node, ast.Name):
            if node.id in BANNED_NAMES or node.id.startswith("__"):
                return f"name {node.id!r}"
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                return f"attribute {node.attr!r}"
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                if name.startswith("__"):
                    return f"name {name!r}"
    return None


# --- inside the grandchild ---------------------------------------------------------------------


class _BoundedOutput:
    """sys.stdout/stderr replacement keeping the first `limit` characters, dropping the rest."""

    def __init__(self, limit: int):
        self.limit, self.size, self.parts = limit, 0, []

    def write(self, s):
        s = str(s)
        if self.size < self.limit:
            self.parts.append(s[: self.limit - self.size])
        self.size += len(s)
        return len(s)

    def flush(self):
        pass

    def getvalue(self) -> str:
        return "".join(self.parts)


def _audit_hook(event, args, _exact=_DENY_EXACT, _prefix=_DENY_PREFIX, _allow=_ALLOW_EXACT,
                _allowed=ALLOWED_MODULES, _guarded=_GUARDED_ATTRS):
    # Only default arguments and methods of built-in types: a program that rebinds builtins or
    # module globals cannot change what this hook decides (any exception refuses the event).
    if event in _allow:
        return
    if event == "import":
        if args[0].partition(".")[0] not in _allowed:
            raise PermissionError(f"sandbox: import of {args[0]!r} refused")
        return
    if event == "object.__setattr__" or event == "object.__delattr__":
        if args[1] in _guarded:
            raise PermissionError(f"sandbox: {event} {args[1]!r} refused")
        return
    if event in _exact or event.startswith(_prefix):
        raise PermissionError(f"sandbox: {event} refused")


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0,
                    _real=builtins.__import__, _allowed=ALLOWED_MODULES):
    if level or name.partition(".")[0] not in _allowed:
        raise ImportError(f"sandbox: import of {name!r} refused")
    return _real(name, globals, locals, fromlist, level)


def _safe_builtins() -> dict:
    safe = {k: v for k, v in vars(builtins).items() if k not in BANNED_NAMES}
    safe["__import__"] = _guarded_import
    return safe


def _confine(cfg: dict, result_fd: int) -> None:
    """Everything the grandchild does to itself before untrusted code runs."""
    if cfg.get("prctl") is not None:  # die with the worker, whatever kills it
        cfg["prctl"](1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != cfg["worker_pid"]:
        os._exit(0)
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.dup2(result_fd, 3)
    os.closerange(4, 1 << 16)
    os.chdir(cfg["tmpdir"])
    if os.geteuid() == 0:  # root can signal and write anything: become nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    cpu = int(cfg["timeout"]) + 1
    limits = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU, then SIGKILL at the hard limit
        (resource.RLIMIT_AS, cfg["vm_bytes"] + int(cfg["memory_mb"]) * (1 << 20)),
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_NOFILE, 4),  # 0-2 on /dev/null, 3 = result pipe: nothing new opens
        (resource.RLIMIT_NPROC, 0),  # no fork, no threads (not enforced for root: see setuid)
    ]
    for which, value in limits:
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(which, (soft, hard))
    sys.stdout = sys.stderr = _BoundedOutput(int(cfg["max_output"]))
    sys.stdin = None
    sys.addaudithook(_audit_hook)


def _summarise(result) -> dict:
    """Reduce the returned object to plain data here, in the sandbox: float(result) (ReFT's
    floatify) and str(result) (ReFT's MathQA path) both run untrusted dunder methods."""
    try:
        value = float(result)
    except BaseException:  # noqa: BLE001 - anything the object raises means "not a number"
        value = None
    try:
        text = str(result)[:MAX_TEXT]
    except BaseException:  # noqa: BLE001
        text = None
    return {"status": "ok", "value": value, "text": text}


def _error(err: BaseException) -> dict:
    try:
        detail = f"{type(err).__name__}: {err}"
    except BaseException:  # noqa: BLE001 - a hostile exception's __str__
        detail = type(err).__name__
    return {"status": "error", "detail": detail[:MAX_DETAIL]}


def prepare(code: str, screen_on: bool):
    """In the worker, before any fork: ReFT's text processing, parse, AST screen, compile.
    Returns a code object, or the final result dict (syntax error / rejected). Parsing and
    compiling never run the program; a pathological input that crashes or hangs the compiler
    takes down only this worker, which the parent replaces."""
    try:
        tree = ast.parse(process_code(code), "<program>")
        if screen_on:
            why = screen_tree(tree)
            if why is not None:
                return {"status": "rejected", "detail": f"AST screen: {why}"}
        return compile(tree, "<program>", "exec")
    except Exception as err:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), MemoryError...
        return _error(err)


def _execute(compiled, cfg: dict, modules: dict) -> dict:
    """ReFT's `run`: exec with separate globals/locals, then `solution()`."""
    g = {"__builtins__": cfg["builtins"], **modules}
    loc = dict(modules)  # ReFT: `import math, sympy` at top level bind in the locals dict
    try:
        exec(compiled, g, loc)
        result = eval("solution()", g, loc)
    except BaseException as err:  # noqa: BLE001 - SystemExit, MemoryError, RecursionError too
        return _error(err)
    return _summarise(result)


def _child_main(compiled, cfg: dict, modules: dict, result_fd: int) -> None:
    try:
        _confine(cfg, result_fd)
        out = _execute(compiled, cfg, modules)
        printed = sys.stdout.getvalue() if isinstance(sys.stdout, _BoundedOutput) else ""
        out["output"] = printed[:MAX_DETAIL]
        data = json.dumps(out).encode()[: MAX_RESULT_BYTES - 4]
        os.write(3, struct.pack(">I", len(data)) + data)
    finally:
        os._exit(0)


# --- the worker --------------------------------------------------------------------------------


def reap(pid: int) -> int:
    """SIGKILL a grandchild's process group, then reap it; returns its wait status. Killing
    before reaping means the pid cannot have been reused by then."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return os.waitpid(pid, 0)[1]


def _read_frame(r: int, deadline: float) -> tuple[bytes | None, str]:
    """One length-prefixed result from the grandchild's pipe: (frame, "ok"), or (None, why)
    with why in "timeout" / "eof" (pipe closed without a result) / "malformed"."""
    buf = b""
    while True:
        if len(buf) >= 4:
            n = struct.unpack(">I", buf[:4])[0]
            if n > MAX_RESULT_BYTES:
                return None, "malformed"
            if len(buf) >= 4 + n:
                return buf[4:4 + n], "ok"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, "timeout"
        ready, _, _ = select.select([r], [], [], remaining)
        if ready:
            data = os.read(r, 65536)
            if not data:
                return None, "eof"
            buf += data


def _wait_exit(pid: int, deadline: float) -> int | None:
    """Wait status of a grandchild that closed its pipe, if it exits before the deadline."""
    while True:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
        if done:
            return wstatus
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def _parse_result(frame: bytes | None) -> dict | None:
    """The grandchild's result, re-typed field by field (it is untrusted data), or None."""
    try:
        out = json.loads(frame.decode()) if frame is not None else None
    except ValueError:
        return None
    if not isinstance(out, dict) or out.get("status") not in ("ok", "error", "rejected"):
        return None
    value, text = out.get("value"), out.get("text")
    return {
        "status": out["status"],
        "value": float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None,
        "text": text[:MAX_TEXT] if isinstance(text, str) else None,
        "detail": str(out.get("detail", ""))[:MAX_DETAIL],
        "output": str(out.get("output", ""))[:MAX_DETAIL],
    }


def _failure(why: str, pid: int, deadline: float) -> dict:
    """Classify a grandchild that gave no usable result; it is reaped on return."""
    wstatus = _wait_exit(pid, deadline) if why == "eof" else None
    if wstatus is None:
        reap(pid)
        if why != "malformed":  # still running at the deadline
            return {"status": "timeout", "detail": "wall-clock limit"}
        return {"status": "error", "detail": "malformed result from the program's process"}
    sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return {"status": "timeout", "detail": f"CPU time limit (signal {sig})"}
    how = f"signal {sig}" if sig else f"exit code {os.waitstatus_to_exitcode(wstatus)}"
    return {"status": "error", "detail": f"program ended without a result ({how})"}


def run_in_child(compiled, cfg: dict, modules: dict) -> tuple[dict, int | None]:
    """Fork a confined grandchild to run one compiled program, wall-clock kill at cfg['timeout'].
    Returns (result, pid still to `reap` or None): on success the caller reports first and
    reaps after, so the grandchild's exit overlaps the report."""
    r, w = os.pipe()
    start = time.monotonic()
    # Forking is safe here: this worker is stdlib-only (never imports JAX) and was itself started
    # by forkserver/spawn from the trainer, so the child inherits no JAX runtime threads.
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child_main(compiled, cfg, modules, w)
    os.close(w)
    try:
        os.setpgid(pid, pid)  # also from the parent side: no window where killpg misses it
    except OSError:
        pass
    deadline = start + float(cfg["timeout"])
    try:
        frame, why = _read_frame(r, deadline)
    finally:
        os.close(r)
    out = _parse_result(frame)
    if out is None:
        out, pid = _failure("malformed" if frame is not None else why, pid, deadline), None
    out["seconds"] = time.monotonic() - start
    return out, pid


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(obj: dict) -> None:
    data = json.dumps(obj).encode()
    os.write(1, struct.pack(">I", len(data)) + data)


def _warm_sympy(sympy) -> None:
    """Run common sympy paths once so their lazy imports happen here, where files can be read
    (inside the sandbox they cannot), ~0.1 s."""
    x, y = sympy.symbols("x y")
    sympy.solve(2 * x - 10, x)
    sympy.solve([sympy.Eq(x + y, 10), sympy.Eq(x - y, 2)], [x, y])
    sympy.solve(x**2 - 4, x)
    sympy.simplify(sympy.Rational(3, 4) * x + x / 4)
    sympy.nsimplify(0.5), sympy.factorint(360), sympy.N(sympy.pi, 10)
    sympy.sympify("2*x+1").subs(x, 3), sympy.nsolve(x**2 - 2, x, 1)
    sympy.expand((x + 1) ** 3), sympy.factor(x**2 - 1), sympy.limit(1 / x, x, sympy.oo)
    sympy.integrate(x, x), sympy.diff(x**3, x), sympy.linsolve([x + y - 3, x - y - 1], [x, y])
    sympy.solveset(x - 1, x), sympy.Matrix([[1, 2], [3, 4]]).det()


def _worker_setup(cfg: dict) -> dict:
    """Import everything a program may touch, then forget the environment."""
    import gc
    import importlib
    import tempfile

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    modules = {}
    for name in _PRELOAD:
        importlib.import_module(name)
    import math

    modules["math"] = math
    if cfg["sympy"]:
        import sympy

        modules["sympy"] = sympy
        _warm_sympy(sympy)
    cfg["tmpdir"] = tempfile.mkdtemp(prefix="reft-sandbox-")
    cfg["worker_pid"] = os.getpid()
    try:  # PR_SET_PDEATHSIG for the grandchildren; ctypes calls are refused inside the sandbox
        import ctypes

        cfg["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        cfg["prctl"] = None
    os.environ.clear()
    try:
        import posix

        posix.environ.clear()
    except (ImportError, AttributeError):
        pass
    cfg["builtins"] = _safe_builtins()  # shared by the grandchildren (each mutates only its copy)
    with open("/proc/self/statm") as f:  # the address space a grandchild starts with, + slack
        cfg["vm_bytes"] = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + (64 << 20)
    gc.collect()
    gc.freeze()  # keep the grandchildren's garbage collector off the worker's pages
    return modules


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    modules = _worker_setup(cfg)
    try:
        _send({"t": "ready", "pid": os.getpid()})
        while True:
            header = _read_exact(0, 4)
            body = None if header is None else _read_exact(0, struct.unpack(">I", header)[0])
            if body is None:
                return 0  # the parent closed the pipe or died
            job = json.loads(body.decode())
            start = time.monotonic()
            compiled = prepare(job["code"], cfg["screen"])
            if isinstance(compiled, dict):
                res, pid = dict(compiled, seconds=time.monotonic() - start), None
            else:
                res, pid = run_in_child(compiled, cfg, modules)
            _send({"t": "done", "id": job["id"], "r": res})
            if pid is not None:
                reap(pid)
    except BrokenPipeError:
        return 0
    finally:
        import shutil

        shutil.rmtree(cfg["tmpdir"], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
