"""The program executor: ReFT's semantics, real SVAMP programs, the "reft" / "strict" policies
(what the official executor runs, checked against a plain `exec` in a separate interpreter), and
a hostile battery.

Short timeouts (2 s) and one batch per battery keep this file fast; the pool is shared by the
module, so the battery also shows that the same pool keeps scoring real programs afterwards.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from reft_jax.config import ConfigError, load_config
from reft_jax.reward.reward import score_completions
from reft_jax.reward.sandbox import (
    REFT_MODULES,
    STRICT_MODULES,
    ProgramExecutor,
    SandboxConfig,
    process_code,
    screen,
    uses_heavy,
)

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


# The official executor (reference §3.2), run in a separate interpreter: `import math` and
# `import sympy` prepended, `sys.exit` -> `print`, stop at the first blank line, a plain `exec`
# with separate globals/locals, `solution()`, then floatify and str. Written out from the
# reference on purpose, rather than importing our `process_code`: it is what we are checked against.
_OFFICIAL = r"""
import json, math, sys
import sympy


def process_code(code):
    code = code.replace("sys.exit", "print")
    lines = ["import math", "import sympy"]
    for line in code.split("\n"):
        if line.startswith("def solution"):
            lines.append(line)
            continue
        if line.strip() == "":
            break
        lines.append(line)
    return "\n".join(lines)


out = []
for code in json.load(sys.stdin):
    g, loc = {"math": math, "sympy": sympy}, {}
    try:
        exec(process_code(code), g, loc)
        result = eval("solution()", g, loc)
    except Exception as err:
        out.append({"error": type(err).__name__})
        continue
    try:
        value = float(result)
    except Exception:
        value = None
    out.append({"value": value, "text": str(result)})
print(json.dumps(out))
"""


def official_results(programs: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _OFFICIAL], input=json.dumps(programs), capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


# Programs the official executor runs, one or more per allowed module, and eval / exec /
# getattr / setattr / harmless dunders; each must give the official executor's result.
OFFICIAL_PROGRAMS = {
    "math": prog("return math.comb(6, 2) + math.gcd(12, 18)"),
    "numpy": prog("import numpy as np", "a = np.array([3, 5, 10])", "return np.mean(a) * 2"),
    "numpy linalg": prog("import numpy as np", "return np.linalg.solve([[2, 1], [1, 3]], [1, 2])[1]"),
    "numpy scalar": prog("import numpy as np", "return np.round(np.float64(2.345) * np.pi, 3)"),
    "numpy random": prog("import numpy as np", "np.random.seed(3)", "return int(np.random.randint(1, 100))"),
    "numpy polyfit": prog("from numpy import polyfit", "return polyfit([0, 1, 2], [1, 3, 5], 1)[0]"),
    "fractions": prog("from fractions import Fraction", "return Fraction(3, 4) + Fraction(1, 6)"),
    "decimal": prog("from decimal import Decimal", "return Decimal('1.10') * 3"),
    "itertools": prog("import itertools", "return len(list(itertools.combinations(range(6), 3)))"),
    "functools": prog("import functools", "return functools.reduce(lambda a, b: a * b, [1, 2, 3, 4])"),
    "statistics": prog("import statistics", "return statistics.median([5, 1, 9, 3])"),
    "datetime": prog("import datetime", "d = datetime.date(2024, 3, 1) - datetime.date(2024, 2, 1)",
                     "return d.days"),
    "datetime strptime": prog("from datetime import datetime",
                              "return datetime.strptime('2024-03-05 10:30', '%Y-%m-%d %H:%M').minute"),
    "time": prog("import time", "start = time.time()", "time.sleep(0.01)", "return time.time() > start"),
    "sympy": prog("x = sympy.symbols('x')", "return sympy.solve(3 * x - 12, x)[0]"),
    "mpmath": prog("import mpmath", "return mpmath.sqrt(16)"),
    "collections": prog("from collections import Counter", "return Counter('banana')['a']"),
    "operator": prog("import operator", "return operator.mul(6, 7)"),
    "re": prog("import re", "return len(re.findall(r'\\d+', 'a1b22c333'))"),
    "string": prog("import string", "return len(string.ascii_lowercase)"),
    "random": prog("import random", "random.seed(7)", "return random.randint(1, 1000)"),
    "cmath": prog("import cmath", "return cmath.sqrt(-4).imag"),
    "numbers": prog("import numbers", "return isinstance(3, numbers.Integral)"),
    "heapq": prog("import heapq", "return heapq.nsmallest(2, [5, 1, 4, 2])[1]"),
    "bisect": prog("import bisect", "return bisect.bisect_left([1, 3, 5, 7], 5)"),
    "calendar": prog("import calendar", "return calendar.monthrange(2024, 2)[1]"),
    "typing": prog("from typing import List", "xs: List[int] = [1, 2]", "return sum(xs)"),
    "copy": prog("import copy", "a = [[1], [2]]", "b = copy.deepcopy(a)", "b[0][0] = 9", "return a[0][0]"),
    "eval": prog("return eval('3 + 2')"),
    "eval locals": prog("price = 4", "return eval('price * 2.5')"),
    "eval math": prog("return eval('math.pi')"),
    "eval with globals": prog("return eval('a + b', {'a': 1, 'b': 2})"),
    "exec": prog("ns = {}", "exec('y = 6 * 7', ns)", "return ns['y']"),
    "getattr": prog("return getattr(math, 'sqrt')(9)"),
    "getattr default": prog("return getattr(math, 'no_such_name', 5)"),
    "setattr": prog("class Box:", "    pass", "b = Box()", "setattr(b, 'n', 4)", "return b.n * 2"),
    "dunder method": prog("return (3).__add__(2) * (10).__rsub__(4)"),
    "dunder names": prog("return type(3).__name__ + (1.5).__class__.__name__"),
    "__name__": prog("return __name__"),
    "class with __init__": prog("class P:", "    def __init__(self, n):", "        self.n = n",
                                "    def __len__(self):", "        return self.n", "return len(P(3))"),
}


def test_allowed_programs_match_the_official_executor(executor):
    names = list(OFFICIAL_PROGRAMS)
    programs = list(OFFICIAL_PROGRAMS.values())
    official = official_results(programs)
    ours = executor.run(programs)
    for name, want, got in zip(names, official, ours):
        assert "error" not in want, (name, want)  # each is a program the official executor runs
        assert got.status == "ok", (name, got)
        assert (got.value, got.text) == (want["value"], want["text"]), (name, got, want)
    by_name = dict(zip(names, ours))
    assert by_name["eval math"].value == pytest.approx(3.141592653589793)
    assert by_name["numpy"].value == 12.0 and by_name["__name__"].text == "builtins"


def test_strict_policy_refuses_what_reft_allows():
    """The strict policy is the first, narrower screen: what it does not allow is rejected
    unseen; `allowed_modules` widens its imports (here: time) and nothing else."""
    strict_fails = {"numpy", "numpy linalg", "numpy scalar", "numpy random", "numpy polyfit", "time",
                    "calendar", "typing", "eval", "eval locals", "eval math", "eval with globals", "exec",
                    "getattr", "getattr default", "setattr", "dunder method", "dunder names", "__name__"}
    modules = tuple(sorted(STRICT_MODULES | {"time"}))
    with ProgramExecutor(timeout=TIMEOUT, policy="strict", allowed_modules=modules, workers=1) as ex:
        results = ex.run(list(OFFICIAL_PROGRAMS.values()))
    by_name = dict(zip(OFFICIAL_PROGRAMS, results))
    for name, r in by_name.items():
        assert r.status == ("rejected" if name in strict_fails - {"time"} else "ok"), (name, r)


def test_all_svamp_programs_reach_their_answers(executor, svamp):
    programs = [row["answer_cot"] for row in svamp]
    assert len(programs) == 3043
    scored = score_completions(programs, [row["answer_value"] for row in svamp], "numeric", "python", executor)
    wrong = [(row["item_id"], s) for row, s in zip(svamp, scored) if s.reward != 1.0]
    assert not wrong, wrong[:5]
    assert not any(uses_heavy(p) for p in programs)  # all ran on the light workers


def test_cache_and_duplicates(executor):
    p = prog("return 41 + 1")
    before = executor.stats().get("cache_hits", 0)
    first = executor.run([p, p, p])
    assert [r.value for r in first] == [42.0] * 3
    assert executor.run([p])[0] == first[0]
    assert executor.stats()["cache_hits"] == before + 1


def test_screen_rules():
    assert screen("import math\nimport sympy\nfrom fractions import Fraction") is None
    always_bad = ("import os", "from subprocess import run", "__import__('os')", "().__class__.__base__",
                  "f.__globals__", "x.__subclasses__()", "open('f')", "compile('1', 'f', 'eval')",
                  "from . import x", "x = globals()", "vars(x)", "len.__self__", "e.__traceback__",
                  "g.gi_frame", "f.f_back", "tb.tb_frame", "random._os", "from statistics import sys",
                  "x = __builtins__", "import importlib", "import ctypes", "import sys")
    for policy in ("reft", "strict"):
        for bad in always_bad:
            assert screen(bad, policy) is not None, (policy, bad)
    reft_only = ("getattr(x, 'y')", "eval('1')", "exec('1')", "setattr(x, 'y', 1)", "(3).__add__(2)",
                 "type(x).__name__", "x.__class__.__name__", "__name__", "super().__init__()",
                 "import numpy as np", "import time", "from typing import List", "import calendar")
    for ok in reft_only:
        assert screen(ok) is None, ok
        assert screen(ok, "strict") is not None, ok
    assert screen("import numpy", "reft", allowed_modules=("math",)) is not None


def test_config_policy_settings():
    assert SandboxConfig().modules == REFT_MODULES
    assert SandboxConfig(policy="strict").modules == STRICT_MODULES
    assert SandboxConfig(allowed_modules=("math", "numpy")).modules == {"math", "numpy"}
    assert {"math", "numpy", "fractions", "decimal", "itertools", "functools", "statistics", "datetime",
            "time", "sympy", "collections", "operator", "re", "string", "random", "cmath", "numbers",
            "heapq", "bisect"} <= REFT_MODULES
    for bad in (dict(policy="lenient"), dict(allowed_modules=("os",)), dict(allowed_modules=("numpy.linalg",)),
                dict(allowed_modules=("_thread",))):
        with pytest.raises(ValueError):
            SandboxConfig(**bad).validate()
    cfg = load_config(SandboxConfig, None, ["policy=strict", "allowed_modules=[math,numpy]"])
    assert (cfg.policy, cfg.allowed_modules) == ("strict", ("math", "numpy"))
    with pytest.raises(ConfigError):
        load_config(SandboxConfig, None, ["policy=lenient"])


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
        # what the "reft" policy opens up: eval / exec / getattr, harmless dunders, numpy, time
        "eval __import__": prog(f"return eval(\"__import__('os').system('touch {new}')\")"),
        "exec open": prog(f"exec(\"open('{new}', 'w').write('pwned')\")", "return 1"),
        "eval real builtins": prog("g = {}", "eval('1', g)", "return g['__builtins__']['open']('/etc/passwd').read()"),
        "eval code object": prog("return eval((lambda: 1).__code__)"),
        "getattr chain": prog("t = getattr(getattr((), '__cla' + 'ss__'), '__ba' + 'se__')",
                              "return len(getattr(t, '__subclasses__')())"),
        "getattr __globals__": prog("f = [c for c in type.mro(type(())) if 1][0]",
                                    "return getattr(f.__init__, '__glob' + 'als__')['os']"),
        "frame walking": prog("def g():", "    yield gen.gi_frame.f_back", "gen = g()", "fr = next(gen)",
                              "while 'os' not in fr.f_globals:", "    fr = fr.f_back",
                              f"return fr.f_globals['os'].system('touch {new}')"),
        "frame walking (runtime)": prog("import operator", "try:", "    1 / 0", "except Exception as e:",
                                        "    fr = operator.attrgetter('__traceback__.tb_frame')(e)",
                                        "while 'os' not in operator.attrgetter('f_globals')(fr):",
                                        "    fr = operator.attrgetter('f_back')(fr)",
                                        f"return operator.attrgetter('f_globals')(fr)['os'].system('touch {new}')"),
        "__subclasses__ (runtime)": prog("import operator", "get = operator.attrgetter",
                                         "for c in get('__class__.__base__.__subclasses__')(())():",
                                         "    if c.__name__ == '_wrap_close':",
                                         f"        return get('__init__.__globals__')(c)['system']('touch {new}')"),
        "sys from statistics": prog("import statistics", f"return statistics.sys.modules['os'].system('touch {new}')"),
        "from statistics import sys": prog("from statistics import sys",
                                           f"return sys.modules['os'].system('touch {new}')"),
        "importlib": prog("import importlib", "return importlib.import_module('os').getpid()"),
        "numpy save": prog("import numpy as np", f"np.save('{new}', np.arange(3))", "return 1"),
        "numpy fromfile": prog("import numpy as np", "return np.fromfile('/etc/passwd', dtype=np.uint8).size"),
        "numpy ctypes": prog("import numpy as np", "return np.ctypeslib.ctypes.CDLL(None).getpid()"),
        "numpy memory bomb": prog("import numpy as np", "return np.ones(10 ** 10).sum()"),
        "numpy slow": prog("import numpy as np", "a = np.ones((2000, 2000))", "while True:", "    a = a @ a"),
        "sleep": prog("import time", "time.sleep(100)", "return 1"),
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
    for name in ("infinite loop", "huge power", "signal tampering (runtime)", "numpy slow", "sleep"):
        assert by_name[name].status == "timeout", (name, by_name[name])
    for name in ("fork bomb", "os.system", "__import__", "__subclasses__", "ctypes", "frame walking",
                 "eval code object", "from statistics import sys", "importlib"):
        assert by_name[name].status == "rejected", (name, by_name[name])
    refused = {"getattr": "getattr of '__self__' refused", "getattr chain": "getattr of '__base__' refused",
               "getattr __globals__": "getattr of '__globals__' refused",
               "eval __import__": "eval refused (AST screen: name '__import__')",
               "exec open": "exec refused (AST screen: name 'open')",
               "eval real builtins": "KeyError",  # eval got the sandbox's builtins, not the real ones
               "frame walking (runtime)": "os.system refused", "__subclasses__ (runtime)": "os.system refused",
               "sys from statistics": "os.system refused", "numpy save": "open refused",
               "numpy fromfile": "Error",  # numpy's C code turns the hook's PermissionError into a SystemError
               "numpy memory bomb": "MemoryError"}
    for name, why in refused.items():
        assert by_name[name].status == "error" and why in by_name[name].detail, (name, by_name[name])
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


def _battery_on_fresh_pool(arena, programs: dict, **config) -> dict:
    """Run the battery as one batch on a new pool (workers started first), check containment,
    return the results by name."""
    with ProgramExecutor(timeout=TIMEOUT, **config) as ex:
        ex.run([prog("return 1"), prog("return sympy.Integer(1)")])
        workers_before = ex.worker_pids()
        started = time.monotonic()
        results = ex.run(list(programs.values()))
        _assert_contained(ex, programs, results, started, workers_before, arena)
    return dict(zip(programs, results))


def test_battery_under_strict_policy(arena):
    """The first, narrower policy contains the same battery, rejecting more of it unseen."""
    by_name = _battery_on_fresh_pool(arena, hostile_programs(*arena), policy="strict")
    for name in ("getattr", "getattr chain", "eval __import__", "exec open", "eval real builtins", "numpy save",
                 "numpy memory bomb", "sleep", "frame walking"):
        assert by_name[name].status == "rejected", (name, by_name[name])


def test_battery_without_ast_screen(arena, monkeypatch):
    """Screen off: the runtime layers alone (restricted builtins, audit hook, rlimits, uid
    nobody, empty environment) contain the same battery."""
    monkeypatch.setenv("REFT_SECRET", "hunter2")  # the pool starts after this: it must not leak
    programs = hostile_programs(*arena)
    programs["environment (dump)"] = prog("return str(sympy.sympify(\"__import__('os').environ\"))")
    by_name = _battery_on_fresh_pool(arena, programs, screen=False)
    assert by_name["environment (dump)"].text == "environ({})"
    assert "os.system refused" in by_name["__subclasses__"].detail
    assert "__code__" in by_name["rewrite a function"].detail
    assert "refused" in by_name["fork bomb"].detail
    for name in ("frame walking", "from statistics import sys", "sys from statistics"):
        assert "os.system refused" in by_name[name].detail, (name, by_name[name])


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
