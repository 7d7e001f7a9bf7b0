"""Record the golden fingerprints: `python tests/golden/record.py` (writes tests/golden/golden.json).
Only re-record for a change that is meant to alter the numbers, and say so in its commit."""
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import runs  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        runs.run_all(pathlib.Path(tmp))
        fp = runs.fingerprint(pathlib.Path(tmp))
    runs.GOLDEN.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
    print(f"{runs.GOLDEN}: " + ", ".join(f"{k} {len(v['metrics'])} rows / {len(v['checkpoints'])} ckpts"
                                        for k, v in fp.items()))
