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
  signals, ctypes and introspection; restricted builtins with an import allow-list (what a
  program may use is the policy, "reft" or "strict": see the policy section below); bounded
  stdout. The allowed modules are imported by the worker, and their lazy imports done there
  (`_warm_sympy`, `_warm_numpy`, `_warm_stdlib`), since the grandchild cannot read files; numpy's
  BLAS is held to one thread (a grandchild cannot start threads).

The worker kills the grandchild's whole process group at the wall-clock deadline.

Protocol on stdin/stdout: frames of a 4-byte big-endian length and a UTF-8 JSON object.
  main -> worker: {"id": int, "code": str}
  worker -> main: {"t": "ready", "pid": int} once, then per job, in order,
                  {"t": "done", "id", "r": {status, value, text, detail, output, seconds}}.
  grandchild -> worker: one frame, the result, on its own pipe.

Why this module is long: it is a standalone script (stdlib only, run as `python -I`), so the
screen, the guarded builtins, the confinement and the protocol cannot be split into modules the
worker would have to import from the package; each layer is kept next to the others it relies on.
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
import types

# --- policy: which imports, builtins and attributes a program may use --------------------------
#
# Two policies. "reft" (the default) runs what the official ReFT executor runs (a plain `exec`
# with every installed module and builtin), minus what only an escape needs; "strict" is the
# narrower screen this sandbox had first (no eval/exec/getattr, no dunder at all, no numpy or
# time). Either way the screen and the guarded builtins are only the first line: strings reach
# attribute lookups the screen cannot see (str.format fields, operator.attrgetter,
# sympy.sympify), and stdlib modules expose `sys` as a plain attribute (statistics.sys,
# typing.sys). What contains a program is the runtime layers of the grandchild (audit hook,
# rlimits, uid nobody, fresh fork, wall-clock kill), which the tests run with the screen off.

POLICIES = ("reft", "strict")

# Modules a program may import (top-level names). All are imported in the worker before any
# program runs, since the grandchild cannot open files (and so cannot import anything new).
STRICT_MODULES = frozenset({
    "math", "cmath", "sympy", "mpmath", "fractions", "decimal", "numbers", "itertools",
    "functools", "collections", "statistics", "operator", "datetime", "string", "re", "random",
    "heapq", "bisect", "copy",
})
REFT_MODULES = STRICT_MODULES | {"numpy", "time", "calendar", "typing"}
# Imported only by the "sympy" workers (forking a worker that holds them costs 3-5x more), which
# run exactly the programs whose text names one of them.
HEAVY_MODULES = frozenset({"sympy", "mpmath", "numpy"})
# Never allowed, whatever allowed_modules says: files, processes, sockets, the interpreter.
NEVER_MODULES = frozenset({
    "os", "posix", "nt", "sys", "builtins", "subprocess", "socket", "ssl", "ctypes", "cffi",
    "importlib", "imp", "pkgutil", "runpy", "zipimport", "io", "_io", "pathlib", "shutil",
    "tempfile", "glob", "signal", "threading", "_thread", "multiprocessing", "concurrent",
    "asyncio", "selectors", "select", "gc", "inspect", "types", "code", "codeop", "pickle",
    "marshal", "shelve", "dbm", "sqlite3", "resource", "mmap", "pty", "fcntl", "urllib", "http",
    "ftplib", "smtplib", "webbrowser", "pdb", "bdb", "trace", "faulthandler", "atexit", "site",
})

# Builtins a program never needs and an escape usually does (`exit`/`quit` close stdin).
_BANNED_ALWAYS = frozenset({
    "compile", "open", "__import__", "globals", "locals", "vars", "input", "breakpoint", "help",
    "memoryview", "exit", "quit", "copyright", "credits", "license", "__builtins__", "__loader__",
    "__spec__",
})
# "reft" keeps eval/exec (they screen their text like the program's own, then run it with the
# sandbox's builtins) and getattr/setattr/delattr (they refuse the attribute names the screen
# refuses). "strict" removes them.
BANNED_NAMES = {
    "reft": _BANNED_ALWAYS,
    "strict": _BANNED_ALWAYS | {"eval", "exec", "getattr", "setattr", "delattr"},
}

# Dunders a "reft" program may name. Each only reads a string or calls the object's own
# behaviour, which plain syntax reaches anyway (`x.__add__(y)` is `x + y`, `x.__class__` is
# `type(x)`, `__name__` is a string; `super().__init__()` in a class). Every other dunder is
# refused, in particular the escape routes: from a type to every class (`__base__`, `__bases__`,
# `__mro__`, `__subclasses__`), from a function to a module namespace and its real builtins
# (`__globals__`, `__builtins__`, `__dict__`, `__self__` of a builtin function is the builtins
# module, `__func__`, `__wrapped__`, `__closure__`, `__code__`, `__defaults__`), attribute
# lookup in disguise (`__getattribute__`, `__getattr__`, `__setattr__`, `__reduce_ex__`), from an
# exception to the frames (`__traceback__`, `__context__`, `__cause__`), and the import system
# (`__import__`, `__loader__`, `__spec__`).
HARMLESS_DUNDERS = frozenset({
    "__name__", "__qualname__", "__doc__", "__module__", "__class__", "__init__", "__new__",
    "__str__", "__repr__", "__format__", "__hash__", "__bool__", "__len__", "__iter__",
    "__next__", "__reversed__", "__contains__", "__getitem__", "__setitem__", "__delitem__",
    "__call__", "__enter__", "__exit__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__abs__", "__neg__", "__pos__", "__invert__", "__round__", "__floor__", "__ceil__",
    "__trunc__", "__int__", "__float__", "__complex__", "__index__", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__", "__rfloordiv__",
    "__ifloordiv__", "__mod__", "__rmod__", "__imod__", "__divmod__", "__rdivmod__", "__pow__",
    "__rpow__", "__ipow__", "__matmul__", "__rmatmul__", "__and__", "__rand__", "__or__",
    "__ror__", "__xor__", "__rxor__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
})
# Public names that walk frames and code objects (generator / coroutine / traceback / frame
# attributes): from any frame, `f_back` leads to the worker's own frames and globals. Refused
# under both policies.
ESCAPE_ATTRS = frozenset({
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "cr_origin",
    "ag_frame", "ag_code", "ag_await", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
    "f_trace", "tb_frame", "tb_next", "co_code", "co_consts",
})


def attribute_refused(name: str, policy: str = "reft") -> bool:
    """Whether a program may not read or write attribute `name` (the screen and the guarded
    getattr / setattr / delattr share this). Private `_names` are refused too: that is where the
    stdlib keeps its imports (`random._os`)."""
    if name in ESCAPE_ATTRS:
        return True
    if not name.startswith("_"):
        return False
    return policy != "reft" or name not in HARMLESS_DUNDERS


def name_refused(name: str, policy: str = "reft") -> bool:
    """Whether a program may not use the bare name `name`."""
    if name in BANNED_NAMES[policy]:
        return True
    return name.startswith("__") and (policy != "reft" or name not in HARMLESS_DUNDERS)


def policy_modules(policy: str, allowed_modules=None) -> frozenset:
    """The importable top-level modules: `allowed_modules`, or the policy's own list."""
    if allowed_modules is None:
        return REFT_MODULES if policy == "reft" else STRICT_MODULES
    return frozenset(allowed_modules)


# Audit events refused inside the grandchild (exact names, then prefixes). Allowed on purpose:
# `exec`/`compile` (sympy generates code), `object.__getattr__` (multipledispatch reads
# `__code__`), `sys._getframe` (lambdify/nsolve). Writing a function's code, defaults or globals
# is refused, so nothing can rewrite the audit hook itself. `time.sleep` is allowed (it raises
# no audit event before Python 3.12 anyway): a sleeping program holds its worker no longer than a
# busy loop would (the wall-clock kill), and the official executor lets it sleep.
_DENY_EXACT = frozenset({"open", "builtins.input", "builtins.breakpoint", "setopencookie"})
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


def screen(code: str, policy: str = "reft", allowed_modules=None) -> str | None:
    """Static AST screen; returns why the program is rejected, or None. Unparsable code passes
    (it fails as a SyntaxError at exec, an `error` like in ReFT)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return screen_tree(tree, policy, policy_modules(policy, allowed_modules))


def screen_tree(tree: ast.AST, policy: str = "reft", modules: frozenset = REFT_MODULES) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in modules:
                    return f"import of {alias.name!r}"
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] not in modules:
                return f"import from {node.module!r}"
            for alias in node.names:  # `from statistics import sys`, `from random import _os`
                if alias.name in NEVER_MODULES or (alias.name != "*" and attribute_refused(alias.name, policy)):
                    return f"import of {alias.name!r} from {node.module!r}"
        elif isinstance(node, ast.Name):
            if name_refused(node.id, policy):
                return f"name {node.id!r}"
        elif isinstance(node, ast.Attribute):
            if attribute_refused(node.attr, policy):
                return f"attribute {node.attr!r}"
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                if name_refused(name, policy):
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
                _allowed=REFT_MODULES, _guarded=_GUARDED_ATTRS):
    # Only default arguments (an immutable tuple: rebinding `__defaults__` is itself an audited,
    # refused event) and methods of built-in types: a program that rebinds builtins or module
    # globals cannot change what this hook decides (any exception refuses the event).
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
                    _real=builtins.__import__, _allowed=REFT_MODULES):
    if level or name.partition(".")[0] not in _allowed:
        raise ImportError(f"sandbox: import of {name!r} refused")
    return _real(name, globals, locals, fromlist, level)


# The "reft" policy's eval / exec / getattr / setattr / delattr. Like the screen they are a first
# line (a program can reach the real ones through module attributes); their own state is in
# default arguments, bound per worker by `_bind`.
_NO_DEFAULT = object()


def _guarded_getattr(obj, name, default=_NO_DEFAULT, _real=builtins.getattr, _refused=attribute_refused,
                     _policy="reft", _type=type, _missing=_NO_DEFAULT):
    if _type(name) is not str or _refused(name, _policy):  # a str subclass could lie to the check
        raise PermissionError(f"sandbox: getattr of {name!r} refused")
    return _real(obj, name) if default is _missing else _real(obj, name, default)


def _guarded_setattr(obj, name, value, _real=builtins.setattr, _refused=attribute_refused,
                     _policy="reft", _type=type):
    if _type(name) is not str or _refused(name, _policy):
        raise PermissionError(f"sandbox: setattr of {name!r} refused")
    return _real(obj, name, value)


def _guarded_delattr(obj, name, _real=builtins.delattr, _refused=attribute_refused, _policy="reft",
                     _type=type):
    if _type(name) is not str or _refused(name, _policy):
        raise PermissionError(f"sandbox: delattr of {name!r} refused")
    return _real(obj, name)


def _guarded_eval(source, globals=None, locals=None, _mode="eval", _run=builtins.eval, _screen=True,
                  _policy="reft", _modules=REFT_MODULES, _builtins=None, _getframe=sys._getframe,
                  _type=type):
    """eval / exec of text only (a code object cannot be screened), screened like a program and
    run with the sandbox's builtins: left to itself, eval would hand globals without
    `__builtins__` the real builtins of this function's frame."""
    if _type(source) is bytes:
        source = source.decode()
    if _type(source) is not str:
        raise PermissionError(f"sandbox: {_mode} of a {_type(source).__name__} refused")
    tree = ast.parse(source.lstrip(" \t") if _mode == "eval" else source, "<string>", _mode)
    why = screen_tree(tree, _policy, _modules) if _screen else None
    if why is not None:
        raise PermissionError(f"sandbox: {_mode} refused (AST screen: {why})")
    if globals is None:  # the caller's namespaces, as the builtin does
        frame = _getframe(1)
        globals = frame.f_globals
        if locals is None:
            locals = frame.f_locals
    elif locals is None:
        locals = globals
    if _type(globals) is not dict:
        raise TypeError(f"{_mode}() globals must be a dict, not {_type(globals).__name__}")
    if "__builtins__" not in globals:
        globals["__builtins__"] = _builtins
    return _run(compile(tree, "<string>", _mode), globals, locals)


def _bind(fn, **defaults):
    """A copy of `fn` with some of its (positional) default arguments replaced."""
    code = fn.__code__
    names = code.co_varnames[code.co_argcount - len(fn.__defaults__):code.co_argcount]
    values = tuple(defaults.pop(n, v) for n, v in zip(names, fn.__defaults__))
    if defaults:
        raise TypeError(f"{fn.__name__} has no defaults {sorted(defaults)}")
    return types.FunctionType(code, fn.__globals__, fn.__name__, values)


def _safe_builtins(policy: str, modules: frozenset, screen_on: bool) -> dict:
    safe = {k: v for k, v in vars(builtins).items() if k not in BANNED_NAMES[policy]}
    safe["__import__"] = _bind(_guarded_import, _allowed=modules)
    if policy == "reft":
        for name, fn in (("getattr", _guarded_getattr), ("setattr", _guarded_setattr),
                         ("delattr", _guarded_delattr)):
            safe[name] = _bind(fn, _policy=policy)
        for name, run in (("eval", builtins.eval), ("exec", builtins.exec)):
            safe[name] = _bind(_guarded_eval, _mode=name, _run=run, _screen=screen_on, _policy=policy,
                               _modules=modules, _builtins=safe)
    return safe


def _sandbox_hook(modules: frozenset):
    return _bind(_audit_hook, _allowed=modules)


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
    sys.addaudithook(cfg["audit_hook"])


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


def prepare(code: str, screen_on: bool, policy: str = "reft", modules: frozenset = REFT_MODULES):
    """In the worker, before any fork: ReFT's text processing, parse, AST screen, compile.
    Returns a code object, or the final result dict (syntax error / rejected). Parsing and
    compiling never run the program; a pathological input that crashes or hangs the compiler
    takes down only this worker, which the parent replaces."""
    try:
        tree = ast.parse(process_code(code), "<program>")
        if screen_on:
            why = screen_tree(tree, policy, modules)
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


def _warm_numpy(np) -> None:
    """Load numpy's lazily imported submodules and run common paths once."""
    import numpy.fft  # noqa: F401 - not imported by `import numpy`
    import numpy.polynomial  # noqa: F401
    import numpy.random  # noqa: F401

    a = np.array([[2.0, 1.0], [1.0, 3.0]])
    np.linalg.solve(a, [1.0, 2.0]), np.linalg.inv(a), np.linalg.det(a), np.linalg.eig(a)
    np.percentile(a, 50), np.median(a), np.round(np.mean(a), 2), np.std(a), np.cumsum(a)
    np.random.default_rng(0).random(3), np.random.seed(0), np.random.randint(1, 10)
    np.polyfit([0, 1, 2], [1, 3, 5], 1), np.roots([1, -3, 2]), np.fft.fft([1, 2])
    str(a), repr(a), str(np.float64(1.5)), np.arange(5).sum(), np.linspace(0, 1, 3)
    np.array([1, 2]).astype(np.int64), np.prod([1, 2]), np.lcm(4, 6), np.gcd(4, 6)


def _warm_stdlib(names) -> None:
    """Lazy imports of the light modules (strptime loads `_strptime`), done while files open."""
    if "datetime" in names:
        import datetime

        datetime.datetime.strptime("2024-03-01 10:30", "%Y-%m-%d %H:%M").strftime("%A %B")
    if "time" in names:
        import time as time_

        time_.strptime("2024-03-01", "%Y-%m-%d"), time_.strftime("%Y"), time_.localtime()
    if "calendar" in names:
        import calendar

        calendar.monthrange(2024, 2), calendar.isleap(2024), calendar.weekday(2024, 3, 1)
        calendar.month_name[1], calendar.day_name[0]


def _worker_setup(cfg: dict) -> dict:
    """Import everything a program may touch, then forget the environment."""
    import gc
    import importlib
    import tempfile

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # numpy's BLAS: no thread pool (a grandchild cannot start threads)
    cfg["allowed"] = allowed = frozenset(cfg["allowed"])
    # Light workers: every allowed module but the heavy ones; "sympy" workers: all of them.
    load = sorted(allowed if cfg["sympy"] else allowed - HEAVY_MODULES)
    loaded = {}
    for name in load:
        try:
            loaded[name] = importlib.import_module(name)
        except ImportError:  # not installed: a program importing it fails, as it would in ReFT
            pass
    _warm_stdlib(loaded)
    if "numpy" in loaded:
        _warm_numpy(loaded["numpy"])
    import math

    modules = {"math": math}  # ReFT binds math and sympy in the program's namespaces
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
    # shared by the grandchildren (each mutates only its copy)
    cfg["builtins"] = _safe_builtins(cfg["policy"], allowed, cfg["screen"])
    cfg["audit_hook"] = _sandbox_hook(allowed)
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
            compiled = prepare(job["code"], cfg["screen"], cfg["policy"], cfg["allowed"])
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
