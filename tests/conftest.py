"""Shared test setup: 8 fake CPU devices for sharding tests, and the shared data directory."""
import os
import pathlib

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("REFT_DATA_DIR", str((_REPO.parent / "shared" / "data").resolve()))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ["REFT_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"REFT_DATA_DIR={path} does not exist; point it at the shared data folder")
    return path
