"""The optional TFDS source, offline: TFDS gsm8k prepared locally from the shared jsonl."""
import pytest

pytest.importorskip("tensorflow_datasets", reason="extra [tfds] not installed")

from reft_jax.data.sources import DataConfig, DataError, load_config_dataset, load_gsm8k_jsonl  # noqa: E402
from reft_jax.data.tfds_source import load_tfds_gsm8k, prepare_gsm8k_from_jsonl  # noqa: E402


def test_tfds_gsm8k_matches_the_jsonl(tmp_path, data_dir):
    with pytest.raises(DataError, match="not prepared"):
        load_tfds_gsm8k("test", tmp_path / "tfds")
    prepare_gsm8k_from_jsonl(data_dir / "gsm8k", tmp_path / "tfds")
    for split, n in (("train", 7473), ("test", 1319)):
        rows = load_tfds_gsm8k(split, tmp_path / "tfds")
        assert rows == load_gsm8k_jsonl(data_dir / "gsm8k" / f"{split}.jsonl")
        assert len(rows) == n
    cfg = DataConfig(dataset="gsm8k", engine="nl", source="tfds", tfds_dir=str(tmp_path / "tfds"))
    test = load_config_dataset(cfg, "test")
    assert test[0].item_id == "gsm8k_0" and test[0].answer_value == "18" and test[0].answer_cot is None
    with pytest.raises(DataError, match="no split"):
        load_tfds_gsm8k("validation", tmp_path / "tfds")
    # the trainers' loader honours the source (it once read the data directory's files instead):
    # with no data directory at all, the rows can only come from TFDS
    from reft_jax.data.splits import load_examples

    cfg = DataConfig(dataset="gsm8k", engine="nl", source="tfds", tfds_dir=str(tmp_path / "tfds"),
                     data_dir=str(tmp_path / "no-such-dir"), max_train_examples=5, max_test_examples=3)
    splits = load_examples(cfg, seed=0)
    assert [r.item_id for r in splits.test] == ["gsm8k_0", "gsm8k_1", "gsm8k_2"]
    assert len(splits.train) == 5 and splits.train[0].answer_cot
