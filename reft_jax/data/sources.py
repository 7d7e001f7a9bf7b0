"""Dataset rows from ReFT-format JSON, the original GSM8K jsonl, or the synthetic generator.

Every row is validated on load: a bad file fails at start-up with a `DataError` naming the file,
the row and the field, not hours later inside a batch. Files are looked up under the data
directory (argument / config `data.data_dir` -> `$REFT_DATA_DIR`); a public file that is missing
there is downloaded from its canonical URL into a cache (`$REFT_CACHE_DIR`) and checked against
its SHA-256, and without a network the error says which file to put where.

Layout under the data directory (the shared-data layout):
    gsm8k/train.jsonl, gsm8k/test.jsonl          original GSM8K (human solutions)
    reft/<src>_nl.json, reft/<src>_python_sdp.json  ReFT train files (with answer_cot)
    reft/<src>_test_set.json                     ReFT test files (no answer_cot)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import urllib.request
from typing import Any, Literal

from reft_jax.data.formats import (ENGINES, HEADER_NEWLINE, MCQ, DataError, Example,  # noqa: F401
                                   answer_kind, gsm8k_solution, normalize_mcq)

DATASETS = ("gsm8k", "svamp", "mathqa", "mathqa-numeric", "synthetic")
SPLITS = ("train", "test")
ENV_DATA_DIR = "REFT_DATA_DIR"
ENV_CACHE_DIR = "REFT_CACHE_DIR"  # where downloads go (default ~/.cache/reft-jax/data)
ENV_OFFLINE = "REFT_OFFLINE"  # set to 1 to never download

_REFT = "https://raw.githubusercontent.com/lqtrung1998/mwp_ReFT/a7fe19ac5a79745cf7b136da89c627d4a8ef8032/data/"
_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
# relative path -> (canonical URL, SHA-256). Digests are those of the files in the shared data
# folder. None: no copy was available to pin it; the first download prints its digest and
# writes it next to the file, and later loads check against that.
REMOTE: dict[str, tuple[str, str | None]] = {
    "gsm8k/train.jsonl": (_GSM8K + "train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k/test.jsonl": (_GSM8K + "test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "reft/gsm8k_test_set.json": (_REFT + "gsm8k_test_set.json", "0f2e17554946d235d2c0cdf9343bb9d3319007bba9596e0665d4f8b341f57016"),
    "reft/svamp_nl.json": (_REFT + "svamp_nl.json", "12e9ee172f08987112244dc95a03877353874b24ff3b8481eab675123b8fdd9d"),
    "reft/svamp_python_sdp.json": (_REFT + "svamp_python_sdp.json", "09936759f652750064b1cb0dc81bce893f0b3e4a21e81d63d5cf738e0a379c3c"),
    "reft/svamp_test_set.json": (_REFT + "svamp_test_set.json", "baba23c85982adad6b7f6a9d6c6cf3b82c4135364a5ac36b8447add90f783d85"),
    "reft/mathqa_test_set.json": (_REFT + "mathqa_test_set.json", "0bcd2eaceeb419e6d9ce55aa20f064e92f3ce9fcf7725bfc5a0bf320769cd8bc"),
    "reft/mathqa-numeric_test_set.json": (_REFT + "mathqa-numeric_test_set.json", "7106aa5810115db4d2767a87753fa549fb870e69a517136b5f690c434072f421"),
    "reft/gsm8k_nl.json": (_REFT + "gsm8k_nl.json", None),
    "reft/gsm8k_python_sdp.json": (_REFT + "gsm8k_python_sdp.json", None),
    "reft/mathqa_nl.json": (_REFT + "mathqa_nl.json", None),
    "reft/mathqa_python_sdp.json": (_REFT + "mathqa_python_sdp.json", None),
    "reft/mathqa-numeric_nl.json": (_REFT + "mathqa-numeric_nl.json", None),
    "reft/mathqa-numeric_python_sdp.json": (_REFT + "mathqa-numeric_python_sdp.json", None),
}


@dataclasses.dataclass
class DataConfig:
    """Which data a run uses and how it is cut (config section `data`). The one data config:
    training, evaluation and sampling all read it."""

    dataset: str = "synthetic"  # gsm8k | svamp | mathqa | mathqa-numeric | synthetic
    engine: str = "nl"  # nl (N-CoT) | python (P-CoT)
    data_dir: str | None = None  # None: $REFT_DATA_DIR
    download: bool = True  # fetch a missing public file (checksummed) into the cache
    source: str = "files"  # or "tfds" (gsm8k N-CoT only; extra [tfds])
    tfds_dir: str | None = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    train_file: str | None = None  # explicit ReFT-format JSON overriding the dataset's train split
    test_file: str | None = None
    max_train_examples: int | None = None  # a prefix of the train set (quick runs)
    max_test_examples: int | None = None
    val_fraction: float = 0.0  # carve a validation split from train for model selection
    max_len: int = 1024  # SFT: total tokens per example (head kept)
    max_prompt_len: int = 300  # rollouts / evaluation: prompt tokens (head kept, as ReFT)
    # P-CoT rollout prefix `def solution():\n    """q"""` then a newline: auto (where the tokenizer
    # keeps it a token apart, as ReFT's newer branch; CodeLlama: yes, GPT-2-style BPEs: no) |
    # always (ReFT main) | never. See prompts.header_newline.
    header_newline: str = "auto"
    # Training examples over max_len (SFT) / prompts over max_prompt_len (rollouts): reported, then
    # drop (never train on a cut answer) | truncate (keep the head, as ReFT) | error; data/lengths.py
    overlong: Literal["drop", "truncate", "error"] = "drop"
    synthetic: dict = dataclasses.field(default_factory=dict)  # generator knobs (SyntheticConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.source not in ("files", "tfds"):
            raise ValueError(f"source must be 'files' or 'tfds', got {self.source!r}")
        if self.source == "tfds" and (self.dataset, self.engine) != ("gsm8k", "nl"):
            raise ValueError("the TFDS source has GSM8K human (N-CoT) solutions only")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be 'nl' or 'python', got {self.engine!r}")
        if self.header_newline not in HEADER_NEWLINE:
            raise ValueError(f"header_newline must be one of {HEADER_NEWLINE}, got {self.header_newline!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.overlong not in ("drop", "truncate", "error"):
            raise ValueError(f"overlong must be drop, truncate or error, got {self.overlong!r}")


# --- the data directory ---------------------------------------------------------------------------


def data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: the argument (config `data.data_dir`), else $REFT_DATA_DIR."""
    chosen = path if path not in (None, "") else os.environ.get(ENV_DATA_DIR)
    if not chosen:
        raise DataError(f"no data directory: set data.data_dir in the config or the environment "
                        f"variable {ENV_DATA_DIR} (e.g. {ENV_DATA_DIR}=../shared/data)")
    resolved = pathlib.Path(chosen).expanduser()
    if not resolved.is_dir():
        raise DataError(f"data directory {resolved} does not exist (from "
                        f"{'the config' if path else ENV_DATA_DIR})")
    return resolved


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_CACHE_DIR, "~/.cache/reft-jax/data")).expanduser()


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(path: pathlib.Path, expected: str | None) -> None:
    pinned = path.with_name(path.name + ".sha256")
    if expected is None and pinned.is_file():
        expected = pinned.read_text().split()[0]
    if expected is not None and sha256_file(path) != expected:
        raise DataError(f"SHA-256 mismatch (expected {expected}); delete it to download again", path)


def locate(relative: str, root: str | os.PathLike | None = None, download: bool = True) -> pathlib.Path:
    """Find a data file under the data directory, else in the download cache, else download a
    known public file into the cache. Files in the data directory are the user's: trusted as
    they are, never written; cached downloads are re-checked against their digest."""
    base = data_dir(root)
    if (base / relative).is_file():
        return base / relative
    cached = _cache_dir() / relative
    if cached.is_file():  # our own download: check it is still what was verified
        _check_digest(cached, REMOTE.get(relative, (None, None))[1])
        return cached
    if relative not in REMOTE:
        raise DataError(f"missing; put the file at {base / relative}", base / relative)
    url, digest = REMOTE[relative]
    if not download or os.environ.get(ENV_OFFLINE, "") not in ("", "0"):
        raise DataError(f"missing and downloads are off; download {url} and put it at {base / relative}",
                        base / relative)
    return fetch(url, cached, digest, base / relative)  # never into the data directory: the user's


def fetch(url: str, target: pathlib.Path, sha256: str | None, manual: pathlib.Path | None = None,
          timeout: float = 60.0) -> pathlib.Path:
    """Download `url` to `target` atomically, verifying its SHA-256 (or pinning it when unknown).
    Failing, the error says to put the file at `manual` (default: `target`) by hand."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - fixed https/file URLs
                    shutil.copyfileobj(resp, out)
            except OSError as err:
                raise DataError(f"cannot download {url} ({err}); without a network, download it "
                                f"elsewhere and put it at {manual or target}", manual or target) from None
        got = sha256_file(pathlib.Path(tmp))
        if sha256 is not None and got != sha256:
            raise DataError(f"downloaded from {url} but SHA-256 is {got}, expected {sha256}", target)
        os.replace(tmp, target)
        if sha256 is None:
            target.with_name(target.name + ".sha256").write_text(f"{got}  {target.name}\n")
            print(f"[reft-jax] downloaded {url} -> {target}; no pinned digest, recorded SHA-256 {got}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# --- readers ---------------------------------------------------------------------------------------


def require_str(row: dict, field: str, path=None, index=None, allow_empty: bool = False) -> str:
    """row[field] as a (non-empty) string, or a DataError naming file, row and field."""
    if field not in row:
        raise DataError("missing", path, index, field)
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} {value!r:.60}", path, index, field)
    if not allow_empty and not value.strip():
        raise DataError("empty", path, index, field)
    return value


def check_answer(value: str, kind: str, path=None, index=None) -> None:
    """DataError unless `value` is a usable gold answer: a finite number (thousands commas
    allowed, as ReFT strips them) or, for MCQ, an option letter a-e."""
    if kind == MCQ:
        if normalize_mcq(value) not in ("a", "b", "c", "d", "e"):
            raise DataError(f"{value!r} is not an option letter a-e", path, index, "answer_value")
        return
    try:
        number = float(value.replace(",", "").strip())
    except ValueError:
        raise DataError(f"{value!r} is not a number", path, index, "answer_value") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise DataError(f"{value!r} is not a finite number", path, index, "answer_value")


def load_reft_json(path: str | os.PathLike, kind: str | None = None,
                   require_cot: bool | None = None) -> list[Example]:
    """Rows of a ReFT JSON file (one list of string-valued objects). `kind` ('numeric'/'mcq')
    defaults to the dataset named by the first item_id's prefix, as ReFT infers it;
    `require_cot` defaults to whether the first row has an answer_cot (train vs test file)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if _is_jsonl(text):
            raise DataError("this is JSON Lines (one object per line); expected one JSON list of objects "
                            "(ReFT's format: [{...}, {...}])", path) from None
        raise DataError(f"malformed JSON: {_json_error(err)} at line {err.lineno} column {err.colno}",
                        path) from None
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror}", path) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start})", path) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got {type(data).__name__}", path)
    if not data:
        raise DataError("no rows", path)
    rows, seen = [], set()
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", path, index)
        item_id = require_str(row, "item_id", path, index)
        if kind is None:
            try:
                kind = answer_kind(item_id)
            except ValueError as err:
                raise DataError(f"cannot tell the dataset from {item_id!r}: {err}; pass kind=",
                                path, index, "item_id") from None
        if require_cot is None:
            require_cot = "answer_cot" in row
        if item_id in seen:
            raise DataError(f"duplicate id {item_id!r}", path, index, "item_id")
        seen.add(item_id)
        question = require_str(row, "question", path, index)
        answer_value = require_str(row, "answer_value", path, index)
        check_answer(answer_value, kind, path, index)
        cot = require_str(row, "answer_cot", path, index) if require_cot else row.get("answer_cot")
        if cot is not None and not isinstance(cot, str):
            raise DataError(f"expected a string, got {type(cot).__name__}", path, index, "answer_cot")
        rows.append(Example(item_id, question, answer_value, cot))
    return rows


def _json_error(err: json.JSONDecodeError) -> str:
    """The decoder's reason without its dangling "at" ("Unterminated string starting at")."""
    return err.msg.removesuffix(" at")


def _is_jsonl(text: str) -> bool:
    """Whether `text` is JSON Lines: at least two lines, the non-empty ones each a JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in lines[:2])
    except json.JSONDecodeError:
        return False


def read_jsonl_object(line: str, path, lineno: int) -> dict:
    """One jsonl line as an object, or a DataError naming file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {_json_error(err)} at column {err.colno}", path,
                        f"line {lineno}") from None
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", path, f"line {lineno}")
    return row


def load_gsm8k_jsonl(path: str | os.PathLike, prefix: str = "gsm8k") -> list[Example]:
    """The original GSM8K jsonl as N-CoT rows; item_id `gsm8k_<row>` (the ReFT test ids)."""
    path = pathlib.Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror}", path) from None
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        row = read_jsonl_object(line, path, index + 1)
        where = f"line {index + 1}"
        question = require_str(row, "question", path, where)
        answer = require_str(row, "answer", path, where)
        try:
            cot, value = gsm8k_solution(answer)
        except ValueError as err:
            raise DataError(str(err), path, where, "answer") from None
        rows.append(Example(f"{prefix}_{len(rows)}", question, value, cot))
    if not rows:
        raise DataError("no rows", path)
    return rows


# --- datasets --------------------------------------------------------------------------------------


def dataset_file(name: str, split: str, engine: str, root: str | os.PathLike | None = None) -> str:
    """The relative path `load_dataset` reads. GSM8K N-CoT train: ReFT's GPT-written file when
    present in the data directory, else the original human solutions (`gsm8k/train.jsonl`)."""
    _check(name, split, engine)
    if split == "test":
        return f"reft/{name}_test_set.json"
    if engine == "python":
        return f"reft/{name}_python_sdp.json"
    if name == "gsm8k" and not (data_dir(root) / "reft/gsm8k_nl.json").is_file():
        return "gsm8k/train.jsonl"
    return f"reft/{name}_nl.json"


def _check(name: str, split: str, engine: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'nl' or 'python', got {engine!r}")


def load_dataset(name: str, split: str, engine: str, data_dir: str | os.PathLike | None = None,
                 download: bool = True) -> list[Example]:
    """Validated rows of one dataset split. `synthetic` needs no files (default generator)."""
    _check(name, split, engine)
    if name == "synthetic":
        from reft_jax.data.synthetic import SyntheticConfig, generate

        return generate(SyntheticConfig(), split, engine)
    relative = dataset_file(name, split, engine, data_dir)
    path = locate(relative, data_dir, download)
    if relative.endswith(".jsonl"):
        return load_gsm8k_jsonl(path)
    rows = load_reft_json(path, kind=answer_kind(name), require_cot=split == "train")
    bad = next((i for i, r in enumerate(rows) if not r.item_id.startswith(f"{name}_")), None)
    if bad is not None:  # ReFT infers the dataset from the id prefix: a mixed-up file misleads it
        raise DataError(f"{rows[bad].item_id!r} does not start with '{name}_'", path, bad, "item_id")
    return rows


def split_source(cfg: DataConfig, split: str) -> str:
    """Where a split's rows come from, for messages: the file's path, or the generator / TFDS."""
    explicit = cfg.train_file if split == "train" else cfg.test_file
    if explicit:
        return str(explicit)
    if cfg.dataset == "synthetic":
        return f"the synthetic {split} split"
    if cfg.source == "tfds":
        return f"TFDS gsm8k ({split})"
    relative = dataset_file(cfg.dataset, split, cfg.engine, cfg.data_dir)
    found = data_dir(cfg.data_dir) / relative
    return str(found if found.is_file() else relative)


def load_config_dataset(cfg: DataConfig, split: str) -> list[Example]:
    """The rows of one split as a DataConfig names them: an explicit file (`train_file` /
    `test_file`), the synthetic generator (with the `synthetic` knobs), TFDS GSM8K
    (`source: tfds`), or a named dataset from the data directory (downloaded when allowed).
    Every trainer, evaluator and command loads data through here."""
    cfg.validate()
    explicit = cfg.train_file if split == "train" else cfg.test_file
    if explicit:
        return load_reft_json(explicit)
    if cfg.dataset == "synthetic":
        from reft_jax import config as config_lib
        from reft_jax.data.synthetic import SyntheticConfig, generate

        # an unknown knob or a bad range: the error names data.synthetic.<knob>
        synthetic = config_lib.from_dict(SyntheticConfig, cfg.synthetic, prefix="data.synthetic")
        return generate(synthetic, split, cfg.engine)
    if cfg.source == "tfds":
        from reft_jax.data.tfds_source import load_tfds_gsm8k

        rows = load_tfds_gsm8k(split, cfg.tfds_dir, cfg.download)
        return rows if split == "train" else [dataclasses.replace(r, answer_cot=None) for r in rows]
    return load_dataset(cfg.dataset, split, cfg.engine, cfg.data_dir, cfg.download)
