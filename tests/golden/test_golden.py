"""The four trainers' short fixed-seed runs give the recorded metrics and checkpoints bit for
bit (see runs.py). Re-record only for a change meant to alter the numbers."""
import json
import sys
import pathlib

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import runs  # noqa: E402


@pytest.mark.slow
def test_trainers_reproduce_the_recorded_runs_bitwise(tmp_path):
    golden = json.loads(runs.GOLDEN.read_text())
    runs.run_all(tmp_path)
    diff = runs.differences(golden, runs.fingerprint(tmp_path))
    assert not diff, "\n".join(diff[:40])
