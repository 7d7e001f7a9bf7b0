"""The train / validation / test rows of a run, as its data config cuts them."""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from reft_jax.data.formats import Example
from reft_jax.data.prompts import sft_prompt, sft_target
from reft_jax.data.sources import DataConfig, load_config_dataset


@dataclasses.dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]


def split_validation(rows: Sequence[Example], fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the rows held out, both in file order."""
    n_val = int(round(len(rows) * fraction))
    held = set(random.Random(f"reft-val/{seed}").sample(range(len(rows)), n_val))
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def load_examples(data: DataConfig, seed: int) -> Splits:
    """Train / val / test rows as the config cuts them (prefixes first, then the val carve;
    `max_test_examples=0` means no test split, hence no evaluation)."""
    train = load_config_dataset(data, "train")[: data.max_train_examples]
    test = load_config_dataset(data, "test")[: data.max_test_examples] if data.max_test_examples != 0 else []
    train, val = split_validation(train, data.val_fraction, seed)
    if not train:
        raise ValueError("no training examples (check data.max_train_examples / val_fraction)")
    return Splits(train, val, test)


def tokenizer_corpus(rows: Sequence[Example], engine: str) -> list[str]:
    """Texts a from-scratch tokenizer is trained on: every training prompt and target."""
    return [sft_prompt(r.question) + sft_target(r, engine) for r in rows]
