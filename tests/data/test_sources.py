"""Data sources against the real shared data, and every way a data file can be wrong."""
import hashlib
import json

import pytest

from reft_jax.data import sources
from reft_jax.data.sources import (DataConfig, DataError, Example, data_dir, dataset_file,
                                   gsm8k_solution, load_config_dataset, load_dataset,
                                   load_gsm8k_jsonl, load_reft_json, locate)


@pytest.mark.parametrize("name, split, engine, count, cot", [
    ("svamp", "train", "nl", 3076, True),
    ("svamp", "train", "python", 3043, True),
    ("svamp", "test", "nl", 1000, False),
    ("gsm8k", "train", "nl", 7473, True),  # human solutions (ReFT's GPT file is not shared)
    ("gsm8k", "test", "python", 1319, False),
    ("mathqa", "test", "nl", 1605, False),
    ("mathqa-numeric", "test", "nl", 1605, False),
    ("synthetic", "train", "python", 2000, True),
])
def test_real_datasets_load_and_validate(data_dir, name, split, engine, count, cot):
    rows = load_dataset(name, split, engine, data_dir)
    assert len(rows) == count
    assert all(isinstance(r, Example) and r.item_id.startswith(f"{name}_") for r in rows)
    assert all((r.answer_cot is not None) == cot for r in rows)


def test_gsm8k_conversion(data_dir):
    first = load_gsm8k_jsonl(data_dir / "gsm8k" / "train.jsonl")[0]
    assert first.item_id == "gsm8k_0"
    assert first.answer_value == "72"
    assert first.answer_cot == ("Natalia sold 48/2 = 24 clips in May.\n"
                                "Natalia sold 48+24 = 72 clips altogether in April and May.")
    cot, value = gsm8k_solution("It costs 1,000 + 234 = $<<1000+234=1234>>1,234.\n#### 1,234")
    assert (cot, value) == ("It costs 1,000 + 234 = $1,234.", "1234")
    with pytest.raises(ValueError):
        gsm8k_solution("no answer line")


def test_mathqa_rows(data_dir):
    mcq = load_dataset("mathqa", "test", "nl", data_dir)
    numeric = load_dataset("mathqa-numeric", "test", "nl", data_dir)
    assert {r.answer_value for r in mcq} <= set("abcde")
    assert [r.item_id.split("_")[1] for r in mcq] == [r.item_id.split("_")[1] for r in numeric]
    assert mcq[0].question.startswith(numeric[0].question) and "\na ) " in mcq[0].question


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("REFT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir(tmp_path / ".") == tmp_path / "."  # the argument (config key) wins
    with pytest.raises(DataError, match="does not exist"):
        data_dir(tmp_path / "nope")
    monkeypatch.delenv("REFT_DATA_DIR")
    with pytest.raises(DataError, match="REFT_DATA_DIR"):
        data_dir()


def test_config_key_and_environment(data_dir, monkeypatch):
    monkeypatch.delenv("REFT_DATA_DIR")
    rows = load_config_dataset(DataConfig(dataset="svamp", engine="python", data_dir=str(data_dir)), "test")
    assert len(rows) == 1000
    with pytest.raises(ValueError):
        DataConfig(dataset="svamp", source="tfds").validate()


# --- bad files -------------------------------------------------------------------------------------


def _write(tmp_path, rows, name="svamp_nl.json"):
    path = tmp_path / name
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


GOOD = {"item_id": "svamp_0", "question": "q?", "answer_cot": "c", "answer_value": "3.0"}


@pytest.mark.parametrize("rows, row, field, message", [
    ('[{"item_id": "svamp_0",', None, None, "malformed JSON"),
    ({"item_id": "svamp_0"}, None, None, "expected a JSON list"),
    ([GOOD, "text"], 1, None, "expected an object"),
    ([GOOD, {k: v for k, v in GOOD.items() if k != "question"} | {"item_id": "svamp_1"}], 1, "question", "missing"),
    ([GOOD, GOOD | {"item_id": "svamp_1", "answer_value": "three"}], 1, "answer_value", "not a number"),
    ([GOOD, GOOD | {"item_id": "svamp_1", "answer_value": 3.0}], 1, "answer_value", "expected a string"),
    ([GOOD, GOOD | {"item_id": "svamp_1", "answer_cot": ""}], 1, "answer_cot", "empty"),
    ([GOOD, GOOD], 1, "item_id", "duplicate"),
    ([GOOD | {"item_id": "aqua_1"}], 0, "item_id", "cannot tell the dataset"),
])
def test_bad_reft_json_names_file_row_field(tmp_path, rows, row, field, message):
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=message) as info:
        load_reft_json(path)
    err = info.value
    assert (err.file, err.row, err.field) == (path, row, field)
    assert str(path) in str(err) and (row is None or f"row {row}" in str(err))


def test_mcq_gold_must_be_a_letter(tmp_path):
    path = _write(tmp_path, [{"item_id": "mathqa_0", "question": "q", "answer_value": "12"}], "m.json")
    with pytest.raises(DataError, match="option letter"):
        load_reft_json(path)
    assert load_reft_json(path, kind="numeric")[0].answer_value == "12"


def test_wrong_dataset_in_file(tmp_path, monkeypatch):
    (tmp_path / "reft").mkdir()
    _write(tmp_path / "reft", [GOOD | {"item_id": "gsm8k_0"}], "svamp_nl.json")
    with pytest.raises(DataError, match="does not start with 'svamp_'"):
        load_dataset("svamp", "train", "nl", tmp_path)


def test_bad_gsm8k_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "1 + 1 = 2\\n#### 2"}\n{"question": "q", "answer": "two"}\n')
    with pytest.raises(DataError, match="line 2: field 'answer': no final"):
        load_gsm8k_jsonl(path)
    path.write_text('{"question": "q", "answer": "x\\n#### abc"}\n')
    with pytest.raises(DataError, match="line 1: field 'answer'"):
        load_gsm8k_jsonl(path)


# --- missing files, downloads -----------------------------------------------------------------------


def test_missing_file_offline_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("REFT_OFFLINE", "1")
    monkeypatch.setenv("REFT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        load_dataset("mathqa", "train", "python", tmp_path)
    msg = str(info.value)
    assert "mwp_ReFT" in msg and "mathqa_python_sdp.json" in msg and str(tmp_path / "reft" / "mathqa_python_sdp.json") in msg


def test_download_verifies_and_pins_checksums(tmp_path, monkeypatch, data_dir):
    """A file:// URL stands in for the network (same code path as https). Downloads go to the
    cache, never into the data directory."""
    monkeypatch.setenv("REFT_CACHE_DIR", str(tmp_path / "cache"))
    source = data_dir / "reft" / "svamp_test_set.json"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(sources.REMOTE, "reft/svamp_test_set.json", (source.as_uri(), digest))
    empty = tmp_path / "data"
    empty.mkdir()
    path = locate("reft/svamp_test_set.json", empty)
    assert path == tmp_path / "cache" / "reft" / "svamp_test_set.json"
    assert path.read_bytes() == source.read_bytes() and not any(empty.iterdir())
    assert len(load_dataset("svamp", "test", "nl", empty)) == 1000

    monkeypatch.setitem(sources.REMOTE, "reft/svamp_nl.json", (source.as_uri(), "0" * 64))
    with pytest.raises(DataError, match="SHA-256 is"):
        locate("reft/svamp_nl.json", empty)
    assert not (tmp_path / "cache" / "reft" / "svamp_nl.json").exists()

    # no pinned digest: the first download records one, later loads check against it
    monkeypatch.setitem(sources.REMOTE, "reft/mathqa_nl.json", (source.as_uri(), None))
    path = locate("reft/mathqa_nl.json", empty)
    assert path.with_name("mathqa_nl.json.sha256").read_text().split()[0] == digest
    path.write_text("[]")
    with pytest.raises(DataError, match="mismatch"):
        locate("reft/mathqa_nl.json", empty)


def test_dataset_files():
    assert dataset_file("svamp", "train", "python", "/") == "reft/svamp_python_sdp.json"
    assert dataset_file("mathqa", "test", "nl", "/") == "reft/mathqa_test_set.json"
    with pytest.raises(ValueError):
        dataset_file("svamp", "dev", "nl", "/")


def test_unreachable_url_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("REFT_CACHE_DIR", str(tmp_path / "cache"))
    missing = (tmp_path / "nowhere" / "mathqa_nl.json").as_uri()  # fails like a dead network
    monkeypatch.setitem(sources.REMOTE, "reft/mathqa_nl.json", (missing, None))
    with pytest.raises(DataError) as info:
        load_dataset("mathqa", "train", "nl", tmp_path)
    assert f"cannot download {missing}" in str(info.value)
    assert f"put it at {tmp_path / 'reft' / 'mathqa_nl.json'}" in str(info.value)
