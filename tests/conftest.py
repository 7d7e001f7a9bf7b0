"""Shared test setup: 8 fake CPU devices for sharding tests, and the shared data directory."""
import os
import pathlib

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Trainers turn JAX's persistent compilation cache on by default; tests keep it off (or use the
# `persistent_compile_cache` fixture's own directory) so nothing lands in the user's cache.
os.environ.setdefault("REFT_COMPILE_CACHE", "")
_REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("REFT_DATA_DIR", str(_REPO.parent / "shared" / "data"))
# absolute: tests run subprocesses from other working directories
os.environ["REFT_DATA_DIR"] = os.path.abspath(os.environ["REFT_DATA_DIR"])

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    # Two SmolLM2 fine-tuning runs side by side can pass 24 GiB (CI lost a worker to it):
    # one xdist group puts them on one worker, one after another (needs --dist loadgroup).
    for item in items:
        if item.get_closest_marker("big_memory"):
            item.add_marker(pytest.mark.xdist_group("big_memory"))


@pytest.fixture(autouse=True)
def _release_memory_after_big_tests(request):
    """Hand a big_memory test's freed heap back to the OS: glibc keeps it in its arenas, and
    an xdist worker that ran one sat at ~10 GiB through the tests after it."""
    yield
    if request.node.get_closest_marker("big_memory"):
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc
            pass


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ["REFT_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"REFT_DATA_DIR={path} does not exist; point it at the shared data folder")
    return path


@pytest.fixture(scope="module")
def persistent_compile_cache(tmp_path_factory):
    """A module-wide on-disk JAX compilation cache: every run of a training loop builds fresh
    jitted functions, so without it each run in a module compiles the same programs again.
    Use with `pytestmark = pytest.mark.usefixtures("persistent_compile_cache")`."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()
