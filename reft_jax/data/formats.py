"""The formats every stage agrees on, defined once: ReFT's prompt strings, the CoT engines, the
answer kinds of each dataset, and a dataset row. Everything downstream (prompts, sources, rewards,
rollouts) imports them from here, so data flows one way and no two modules spell them out.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

# ReFT's prompt strings (reference §2), byte-identical to the official code.
INSTRUCTION = "Question:\n"
COT_TRIGGER = "\nAnswer reasoning:\n"
ANSWER_TRIGGER = "\nTherefore, the answer is: "
ENGINES = ("nl", "python")  # N-CoT, P-CoT
HEADER_NEWLINE = ("auto", "always", "never")  # `data.header_newline`, see prompts.header_newline

# Answer kinds: numeric answers compare with a tolerance, MathQA's letters exactly.
NUMERIC, MCQ = "numeric", "mcq"
KINDS = (NUMERIC, MCQ)
_DATASET_KINDS = {"gsm8k": NUMERIC, "svamp": NUMERIC, "mathqa-numeric": NUMERIC,
                  "synthetic": NUMERIC, "mathqa": MCQ}


def answer_kind(dataset: str) -> str:
    """'numeric' or 'mcq' for a dataset name (or an item_id prefix such as `svamp_12`)."""
    name = dataset if dataset in _DATASET_KINDS else dataset.rsplit("_", 1)[0]
    if name not in _DATASET_KINDS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(_DATASET_KINDS)}")
    return _DATASET_KINDS[name]


def normalize_mcq(text: Any) -> str:
    """ReFT's MathQA normalisation: `str(x).lower()`, drop `"` and `'`, strip."""
    return str(text).lower().replace('"', "").replace("'", "").strip()


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


class DataError(ValueError):
    """A data file that cannot be used; the message names file, row and field."""

    def __init__(self, message: str, file: str | os.PathLike | None = None,
                 row: int | str | None = None, field: str | None = None):
        self.file, self.row, self.field = file, row, field
        where = [str(file)] if file is not None else []
        if row is not None:  # an int is a list index; a str is already a label ("line 7")
            where.append(row if isinstance(row, str) else f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where + [message]))


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem. All strings, as in ReFT's files; answer_cot is None for test rows."""

    item_id: str
    question: str
    answer_value: str
    answer_cot: str | None = None


_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """(N-CoT, answer_value) from a GSM8K human solution: calculator annotations `<<a*b=c>>`
    removed, the final `#### n` line dropped, n without thousands commas."""
    body, sep, final = answer.rpartition("\n#### ")
    if not sep:
        raise ValueError("no final '#### <answer>' line")
    value = final.replace(",", "").strip()
    float(value)  # ValueError for a non-numeric answer
    cot = _CALC.sub("", body).strip()
    if "<<" in cot or ">>" in cot:
        raise ValueError("unbalanced calculator annotation")
    return cot, value
