"""The program executor: ReFT's semantics, real SVAMP programs, and a hostile battery.

Short timeouts (2 s) and one batch per battery keep this file fast; the pool is shared by the
module, so the battery also shows that the same pool keeps scoring real programs afterwards.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import tempfile
import time

import pytest

from reft_jax.reward.reward import score_completions
from reft_jax.reward.sandbox import ProgramExecutor, process_code, screen, uses_sympy

TIMEOUT = 2.0
NOBODY = 65534


@pytest.fixture(scope="module")
def executor():
    with ProgramExecutor(timeout=TIMEOUT) as ex:
        yield ex


@pytest.fixture(scope="module")
def svamp(data_dir):
    return json.loads((data_dir / "reft" / "svamp_python_sdp.json").read_text())


def prog(*body: str) -> str:
    return "\n".join(["def solution():", *("    " + line for line in body)])


def sympify(expr: str) -> str:
    """Hide an escape inside a sympy string: passes the AST screen, so the runtime layers
    (audit hook, rlimits, uid nobody) are what must stop it."""
    return prog(f"return sympy.sympify({expr!r})")


# --- semantics -----------------------------------------------------------------------------------


def test_process_code_matches_reft():
    code = "def solution():\n    x = 1\n    sys.exit(3)\n\n    return 99\nprint('after')"
    assert process_code(code) == "def solution():\n    x = 1\n    print(3)"
    # a `def solution` line is kept even after other lines; a whitespace-only line also stops
    assert process_code("a = 1\ndef solution():\n  \n    return a") == "a = 1\ndef solution():"


def test_reft_execution_semantics(executor):
    cases = [
        prog("a = 3", "b = 4", "result = a * b", "return result"),
        prog("return math.sqrt(16) + math.floor(2.5)"),
        prog('x = sympy.symbols("x")', "return sympy.solve(2 * x - 10, x)[0]"),
        prog("return 7", "", "    return 8"),  # truncated at the blank line
        prog("sys.exit(5)"),  # -> print(5): returns None
        "helper = 2\n" + prog("return helper"),  # separate globals/locals: NameError, as in ReFT
        "from fractions import Fraction\n" + prog("return 1"),
        prog("from fractions import Fraction", "return Fraction(3, 4) * 4"),
        prog("return 'c'"),
        prog("return [1, 2]"),
        prog("return 1 / 0"),
        prog("return ("),  # syntax error
        prog("print('hello')", "return True"),
    ]
    r = executor.run(cases)
    assert [x.status for x in r] == ["ok", "ok", "ok", "ok", "ok", "error", "ok", "ok", "ok", "ok",
                                     "error", "error", "ok"]
    assert [x.value for x in r[:5]] == [12.0, 6.0, 5.0, 7.0, None]
    assert r[4].output.strip() == "5"
    assert "NameError" in r[5].detail and "helper" in r[5].detail
    assert r[7].value == 3.0
    assert (r[8].value, r[8].text) == (None, "c")
    assert (r[9].value, r[9].text) == (None, "[1, 2]")
    assert "ZeroDivisionError" in r[10].detail and "SyntaxError" in r[11].detail
    assert (r[12].value, r[12].output) == (1.0, "hello\n")


def test_all_svamp_programs_reach_their_answers(executor, svamp):
    programs = [row["answer_cot"] for row in svamp]
    assert len(programs) == 3043
    scored = score_completions(programs, [row["answer_value"] for row in svamp], "numeric", "python", executor)
    wrong = [(row["item_id"], s) for row, s in zip(svamp, scored) if s.reward != 1.0]
    assert not wrong, wrong[:5]
    assert not any(uses_sympy(p) for p in programs)  # all ran on the light workers


def test_cache_and_duplicates(executor):
    p = prog("return 41 + 1")
    before = executor.stats().get("cache_hits", 0)
    first = executor.run([p, p, p])
    assert [r.value for r in first] == [42.0] * 3
    assert executor.run([p])[0] == first[0]
    assert executor.stats()["cache_hits"] == before + 1


def test_screen_rules():
    assert screen("import math\nimport sympy\nfrom fractions import Fraction") is None
    for bad in ("import os", "from subprocess import run", "__import__('os')", "getattr(x, 'y')",
                "().__class__", "open('f')", "eval('1')", "exec('1')", "from . import x",
                "x = globals()"):
        assert screen(bad) is not None, bad


def test_bad_inputs_are_rejected_without_running(executor):
    r = executor.run([None, "x" * 200_000, ""])
    assert [x.status for x in r] == ["rejected", "rejected", "error"]


# --- hostile battery -----------------------------------------------------------------------------


@pytest.fixture
def arena():
    """A world-writable directory (in world-traversable /tmp, unlike pytest's tmp_path) with a
    canary, so only the sandbox, not file permissions, protects them; and a listening socket
    nobody should reach."""
    arena = pathlib.Path(tempfile.mkdtemp(prefix="reft-arena-", dir="/tmp"))
    arena.chmod(0o777)
    canary = arena / "canary.txt"
    canary.write_text("alive")
    canary.chmod(0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield arena, canary, listener
    listener.close()
    shutil.rmtree(arena)


def hostile_programs(arena: pathlib.Path, canary: pathlib.Path, listener: socket.socket) -> dict[str, str]:
    new = str(arena / "new.txt")
    port = listener.getsockname()[1]
    return {
        "infinite loop": prog("while True:", "    pass"),
        "huge power": prog("return 7 ** (10 ** 9)"),
        "memory bomb": prog("chunks = []", "while True:", "    chunks.append(bytearray(10 ** 8))"),
        "memory bomb (one alloc)": prog("return len('x' * 10 ** 12)"),
        "fork bomb": prog("import os", "while True:", "    os.fork()"),
        "fork bomb (runtime)": sympify("[__import__('os').fork() for _ in range(100)]"),
        "thread bomb": prog("import threading", "while True:", "    threading.Thread(target=len).start()"),
        "thread bomb (runtime)": sympify("[__import__('_thread').start_new_thread(len, ((),)) for _ in range(100)]"),
        "os.system": prog("import os", f"return os.system('touch {new}')"),
        "os.system (runtime)": sympify(f"__import__('os').system('touch {new}')"),
        "subprocess": prog("import subprocess", f"return subprocess.call(['touch', '{new}'])"),
        "subprocess (runtime)": sympify(f"__import__('subprocess').call(['touch', '{new}'])"),
        "write file": prog(f"return open('{new}', 'w').write('pwned')"),
        "write file (runtime)": sympify(f"open('{canary}', 'w').write('pwned')"),
        "delete file": prog("import os", f"os.remove('{canary}')", "return 1"),
        "delete file (runtime)": sympify(f"__import__('os').remove('{canary}')"),
        "read /etc/passwd": prog("return len(open('/etc/passwd').read())"),
        "read /etc/passwd (runtime)": sympify("len(open('/etc/passwd').read())"),
        "environment": prog("import os", "return len(os.environ['REFT_SECRET'])"),
        "environment (runtime)": sympify("len(__import__('os').environ['REFT_SECRET'])"),
        "socket connect": prog("import socket", f"return socket.create_connection(('127.0.0.1', {port})).fileno()"),
        "socket connect (runtime)": sympify(f"__import__('socket').create_connection(('127.0.0.1', {port})).fileno()"),
        "kill the parent": prog("import os, signal", "os.kill(os.getppid(), signal.SIGKILL)", "return 1"),
        "kill the parent (runtime)": sympify("__import__('os').kill(__import__('os').getppid(), 9)"),
        "recursion bomb": prog("def f(n):", "    return f(n + 1) + 1", "return f(0)"),
        "sys.exit": prog("import sys", "sys.exit(0)"),
        "SystemExit": prog("raise SystemExit(0)"),
        "megabytes of stdout": prog("for _ in range(50):", "    print('x' * 10 ** 6)"),
        "signal tampering": prog("import signal", "signal.signal(signal.SIGXCPU, signal.SIG_IGN)", "while True:", "    pass"),
        "signal tampering (runtime)": prog("sympy.sympify(\"__import__('signal').signal(24, 1)\")",
                                           "while True:", "    pass"),
        "ctypes": prog("import ctypes", "return ctypes.CDLL(None).getpid()"),
        "ctypes (runtime)": sympify("__import__('ctypes').CDLL(None).getpid()"),
        "__import__": prog("return __import__('os').system('true')"),
        "getattr": prog("b = getattr(len, '__self__')", "return b.open('/etc/passwd').read()"),
        "__subclasses__": prog("for c in ().__class__.__base__.__subclasses__():",
                               "    if c.__name__ == '_wrap_close':",
                               f"        return c.__init__.__globals__['system']('touch {new}')"),
        "rewrite a function": prog("f = lambda: 1", "f.__code__ = (lambda: 2).__code__", "return f()"),
        "parser bomb": prog("return " + "(" * 3000 + "1" + ")" * 3000),
        "forged result": sympify("__import__('os').write(3, b'\\x00\\x00\\x00\\x10{\"status\": \"ok\"}')"),
    }


def _processes() -> list[tuple[int, int, int, int]]:
    """(pid, ppid, pgid, uid) of every process."""
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            uid = int((entry / "status").read_text().split("Uid:")[1].split()[0])
        except (OSError, IndexError):
            continue
        out.append((int(entry.name), int(fields[1]), int(fields[2]), uid))
    return out


def _is_sandbox_worker(pid: int) -> bool:
    try:
        return b"sandbox_worker.py" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _strays(ex, wait: float = 2.0) -> list:
    """Children of our workers, and uid-nobody processes whose parent is no sandbox worker
    (orphans; another executor's in-flight grandchildren are not ours), still there after
    `wait` s: a worker reaps its last grandchild just after reporting, hence the short wait."""
    deadline = time.monotonic() + wait
    while True:
        strays = [p for p in _processes() if p[1] in ex.worker_pids()
                  or (p[3] == NOBODY and not _is_sandbox_worker(p[1]))]
        if not strays or time.monotonic() > deadline:
            return strays
        time.sleep(0.05)


def _assert_contained(ex, programs, results, started, workers_before, arena):
    """Reward 0 for every program, each within timeout + 1 s; no stray process; the pool, the
    files and the listening socket untouched."""
    arena_dir, canary, listener = arena
    rewards = score_completions(list(programs.values()), ["42"] * len(programs), "numeric", "python", ex)
    for name, r, s in zip(programs, results, rewards):
        assert s.reward == 0.0, (name, r)
        assert r.seconds <= TIMEOUT + 1.0, (name, r)
    timeouts = sum(r.status == "timeout" for r in results)
    assert time.monotonic() - started <= timeouts * (TIMEOUT + 1.0) + 10, "batch too slow"
    assert sorted(ex.worker_pids()) == sorted(workers_before), "a worker died or was replaced"
    assert not _strays(ex), f"stray sandbox processes (pid, ppid, pgid, uid): {_strays(ex)}"
    assert canary.read_text() == "alive"
    assert sorted(p.name for p in arena_dir.iterdir()) == ["canary.txt"]
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_hostile_battery(executor, arena, svamp):
    programs = hostile_programs(*arena)
    workers_before = executor.worker_pids()
    started = time.monotonic()
    results = executor.run(list(programs.values()))  # one batch
    _assert_contained(executor, programs, results, started, workers_before, arena)
    by_name = dict(zip(programs, results))
    for name in ("infinite loop", "huge power", "signal tampering (runtime)"):
        assert by_name[name].status == "timeout", (name, by_name[name])
    for name in ("fork bomb", "os.system", "__import__", "getattr", "__subclasses__", "ctypes"):
        assert by_name[name].status == "rejected", (name, by_name[name])
    assert "os.system refused" in by_name["os.system (runtime)"].detail
    assert "os.kill refused" in by_name["kill the parent (runtime)"].detail
    assert "open refused" in by_name["read /etc/passwd (runtime)"].detail
    assert "MemoryError" in by_name["memory bomb (one alloc)"].detail
    assert by_name["memory bomb"].status in ("error", "timeout")  # MemoryError, unless slow to fill
    assert "RecursionError" in by_name["recursion bomb"].detail
    assert len(by_name["megabytes of stdout"].output) <= 300
    # the same pool still scores real programs
    sample = svamp[:200]
    again = executor.run([row["answer_cot"] for row in sample])
    assert all(abs(r.value - float(row["answer_value"])) <= 1e-2 for r, row in zip(again, sample))


def test_battery_without_ast_screen(arena, monkeypatch):
    """Screen off: the runtime layers alone (restricted builtins, audit hook, rlimits, uid
    nobody, empty environment) contain the same battery."""
    monkeypatch.setenv("REFT_SECRET", "hunter2")  # the pool starts after this: it must not leak
    programs = hostile_programs(*arena)
    programs["environment (dump)"] = prog("return str(sympy.sympify(\"__import__('os').environ\"))")
    with ProgramExecutor(timeout=TIMEOUT, screen=False) as ex:
        ex.run([prog("return 1"), prog("return sympy.Integer(1)")])
        workers_before = ex.worker_pids()
        started = time.monotonic()
        results = ex.run(list(programs.values()))
        _assert_contained(ex, programs, results, started, workers_before, arena)
        by_name = dict(zip(programs, results))
        assert by_name["environment (dump)"].text == "environ({})"
        assert "os.system refused" in by_name["__subclasses__"].detail
        assert "__code__" in by_name["rewrite a function"].detail
        assert "refused" in by_name["fork bomb"].detail


def test_dead_and_hung_workers_are_replaced():
    with ProgramExecutor(timeout=1.0, grace=0.5, workers=1, sympy_workers=1) as ex:
        ex.run([prog("return 1"), prog("return sympy.Integer(2)")])
        [light] = ex.worker_pids("light")
        os.kill(light, signal.SIGKILL)  # dies between batches
        assert [r.value for r in ex.run([prog("return 3")])] == [3.0]
        assert light not in ex.worker_pids()
        [hung] = ex.worker_pids("light")
        ex.run([prog("return 4")])
        os.kill(hung, signal.SIGSTOP)  # hangs: the parent-side deadline must fire
        started = time.monotonic()
        results = ex.run([prog(f"return {i}") for i in range(5)])
        assert time.monotonic() - started < 1.0 + 0.5 + 3
        assert sum(r.status == "timeout" for r in results) == 1
        assert sorted(r.value for r in results if r.status == "ok") == sorted(
            float(i) for i, r in enumerate(results) if r.status == "ok")
        assert hung not in ex.worker_pids()
        assert ex.stats()["worker_restarts"] == 2
    assert not any(p[0] == hung for p in _processes())
