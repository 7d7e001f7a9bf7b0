"""Optional TensorFlow Datasets source for GSM8K (extra `[tfds]`; works without tensorflow).

Without tensorflow, TFDS reads only the `array_record` format through `as_data_source()`. Rows
become the same N-CoT `Example`s as the original jsonl (`sources.gsm8k_solution`).

Offline use: `prepare_gsm8k_from_jsonl(jsonl_dir, tfds_dir)` builds the TFDS dataset from local
`train.jsonl` / `test.jsonl` (the stock builder would download them and, offline, hang on DNS
retries for minutes). That build keeps the files' row order, so ids `gsm8k_<row>` are ReFT's. A
dataset built by stock TFDS is stored shuffled by key: ids then follow TFDS's order.
"""
from __future__ import annotations

import os
import pathlib

from reft_jax.data.formats import DataError, Example, gsm8k_solution


def _tfds():
    try:
        import tensorflow_datasets as tfds
        from tensorflow_datasets.text.gsm8k import gsm8k as builder_module
    except ImportError as err:
        raise DataError(f"the TFDS source needs `pip install reft-jax[tfds]` ({err})") from None
    return tfds, builder_module


def tfds_data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Argument, else $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
    return pathlib.Path(path or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def prepare_gsm8k_from_jsonl(jsonl_dir: str | os.PathLike, tfds_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Build TFDS `gsm8k` (array_record, original row order) from local jsonl files; no network."""
    tfds, module = _tfds()
    jsonl_dir = pathlib.Path(jsonl_dir)
    splits = {k: jsonl_dir / f"{k}.jsonl" for k in ("train", "test") if (jsonl_dir / f"{k}.jsonl").is_file()}
    if not splits:
        raise DataError("no train.jsonl or test.jsonl to build TFDS gsm8k from", jsonl_dir)

    class LocalGsm8k(module.Gsm8k, skip_registration=True):
        name = "gsm8k"  # same name and version: `tfds.builder("gsm8k")` reads the result
        # A one-part module name sends TFDS's `code_path` down its plain-file branch; the
        # package branch needs `importlib_resources`, which TFDS does not install on py>=3.9.
        __module__ = "reft_jax_local_gsm8k"

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=module._DESCRIPTION,
                features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in module._FEATURES}),
                homepage="https://github.com/openai/grade-school-math", citation=module._CITATION,
                disable_shuffling=True,  # keep the file order, hence ReFT's ids
            )

        def _split_generators(self, dl_manager):
            return {k: self._generate_examples(path) for k, path in splits.items()}

    builder = LocalGsm8k(data_dir=str(tfds_data_dir(tfds_dir)), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return pathlib.Path(builder.data_dir)


def load_tfds_gsm8k(split: str, tfds_dir: str | os.PathLike | None = None, download: bool = False) -> list[Example]:
    """GSM8K `train`/`test` from TFDS as N-CoT Examples. Not prepared and `download=False`: a
    DataError saying how to prepare it (online `tfds build gsm8k --file_format=array_record`,
    or offline `prepare_gsm8k_from_jsonl`)."""
    tfds, _ = _tfds()
    root = tfds_data_dir(tfds_dir)
    builder = tfds.builder("gsm8k", data_dir=str(root), file_format="array_record")
    if not builder.is_prepared():
        if not download:
            raise DataError("TFDS gsm8k is not prepared there; run `tfds build gsm8k --file_format="
                            "array_record` (online) or reft_jax.data.tfds_source.prepare_gsm8k_from_jsonl"
                            "(DIR_WITH_JSONL, TFDS_DIR) (offline)", root)
        builder.download_and_prepare(file_format="array_record")
    if split not in builder.info.splits:
        raise DataError(f"TFDS gsm8k has no split {split!r}", builder.data_dir)
    source = builder.as_data_source(split=split)
    rows = []
    for index in range(len(source)):
        record = source[index]
        question = record["question"].decode("utf-8")
        try:
            cot, value = gsm8k_solution(record["answer"].decode("utf-8"))
        except ValueError as err:
            raise DataError(str(err), builder.data_dir, f"{split}[{index}]", "answer") from None
        rows.append(Example(f"gsm8k_{index}", question, value, cot))
    return rows
