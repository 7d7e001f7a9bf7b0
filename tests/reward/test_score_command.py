"""`reft score` end to end (in-process through the CLI entry point)."""
import json

import pytest

from reft_jax.cli import main
from reft_jax.data.prompts import ANSWER_TRIGGER


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_score_programs_with_answer_values(tmp_path, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [
        {"completion": "def solution():\n    return 6 * 7", "answer_value": "42"},
        {"completion": "def solution():\n    return 41", "answer_value": "42"},
        {"completion": "def solution():\n    import os\n    return 1", "answer_value": 42},
        {"completion": "def solution():\n    while True:\n        pass", "answer_value": "42"},
    ])
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(preds), "--dataset", "gsm8k", "--engine", "python", "--out", str(out),
                 "--timeout", "1"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["reward"] for x in lines] == [1.0, 0.1, 0.0, 0.0]
    assert [x["status"] for x in lines] == ["ok", "ok", "rejected", "timeout"]
    assert lines[0]["prediction"] == 42.0
    printed = capsys.readouterr().out
    assert "accuracy 25.00% (1/4)" in printed and "executor:" in printed


def test_score_nl_joined_by_item_id(tmp_path, data_dir, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [
        {"item_id": "mathqa_0", "completion": f"...{ANSWER_TRIGGER}A"},
        {"item_id": "mathqa_2", "completion": "garbage"},
    ])
    assert main(["score", str(preds), "--engine", "nl", "--data",
                 str(data_dir / "reft" / "mathqa_test_set.json"), "--out", str(tmp_path / "o.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.1]  # MCQ garbage: partial, as in the official code
    assert main(["score", str(preds), "--engine", "nl", "--mcq-invalid-zero", "--data",
                 str(data_dir / "reft" / "mathqa_test_set.json"), "--out", str(tmp_path / "o.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.0]


def test_score_reference_file(data_dir, capsys):
    assert main(["score", "--reference", str(data_dir / "reft" / "svamp_nl.json"), "--engine", "nl"]) == 0
    assert "accuracy 100.00% (3076/3076)" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ('{"completion": "x", "answer_value": "1"', "line 2: malformed JSON"),
    ('{"answer_value": "1"}', "line 2: field 'completion': missing"),
    ('{"completion": "x"}', "line 2: field 'answer_value': missing"),
    ('{"completion": "x", "answer_value": "seven"}', "line 2: field 'answer_value': 'seven' is not a number"),
    ('{"completion": "x", "item_id": "gsm8k_3"}', "line 2: field 'item_id': has only item_id"),
])
def test_bad_input_names_file_line_and_field(tmp_path, capsys, line, message):
    preds = _write_jsonl(tmp_path / "bad.jsonl", ['{"completion": "x", "answer_value": "1"}', line])
    assert main(["score", str(preds), "--dataset", "gsm8k", "--engine", "nl"]) == 2
    err = capsys.readouterr().err
    assert str(preds) in err and message in err, err


def test_nl_detail_says_whether_the_trigger_is_missing(tmp_path, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [
        {"completion": "I think it is many.", "answer_value": "3"},
        {"completion": f"so{ANSWER_TRIGGER}many", "answer_value": "3"},
        {"completion": f"so{ANSWER_TRIGGER}3", "answer_value": "3"},
    ])
    out = tmp_path / "o.jsonl"
    assert main(["score", str(preds), "--dataset", "svamp", "--engine", "nl", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["detail"] for r in rows] == ["no answer trigger", "no number after the answer trigger", ""]
