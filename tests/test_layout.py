"""The package's shape: no import loops (module-level or lazy, TYPE_CHECKING aside), no module
over ~400 lines without a reason stated at its top, and the pipeline's folders present."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "reft_jax"
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the reft_jax modules it imports (a `from pkg import name` of a submodule
    counts as importing the submodule)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("reft_jax"):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    found = cycles(import_graph())
    assert not found, "import loops: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_loops_between_folders():
    """Data flows one way down the pipeline: collapse modules to their top-level folder (or
    top-level module) and the graph must still have no loop."""
    folded: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        top = ".".join(mod.split(".")[:2])
        folded.setdefault(top, set()).update(".".join(d.split(".")[:2]) for d in deps)
    for top in folded:
        folded[top].discard(top)
        folded[top].discard("reft_jax")
    found = cycles({k: {d for d in v if d in folded} for k, v in folded.items()})
    assert not found, "folder-level import loops: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_walker_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_long_modules_say_why():
    long = []
    for mod, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "Why this module is long" not in text[:4000]:
            long.append(f"{mod} ({text.count(chr(10))} lines)")
    assert not long, "modules over 400 lines without 'Why this module is long' in the docstring: " + ", ".join(long)


@pytest.mark.parametrize("folder", ["model", "data", "reward", "rollout", "train", "eval", "commands"])
def test_pipeline_folders(folder):
    assert (PKG / folder / "__init__.py").is_file()
