"""Answer extraction, normalisation and comparison: pure functions, ReFT's exact semantics
(reference §1.3, §2 "Decoding a completion for scoring", §3).

A prediction is a float (numeric datasets), a str (MathQA multiple choice) or None (nothing
usable). Deliberately as strict as the official code: the N-CoT answer is `float()` of the text
after the last answer trigger, with no comma removal or unit stripping, because the reward the
policy optimises must be the one the paper reports.
"""
from __future__ import annotations

import math
from typing import Any

from reft_jax.data.formats import (ANSWER_TRIGGER, COT_TRIGGER, KINDS, MCQ, NUMERIC,  # noqa: F401
                                   answer_kind, normalize_mcq)

MCQ_OPTIONS = frozenset("abcde")
TOLERANCE = 1e-2  # absolute, as in the official code (loose for small MathQA-numeric answers)

Prediction = float | str | None


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"answer kind must be one of {KINDS}, got {kind!r}")
    return kind


def floatify(x: Any) -> float | None:
    """ReFT's floatify: `float(x)` or None."""
    try:
        return float(x)
    except Exception:  # noqa: BLE001 - any failure means "not a number"
        return None


def parse_gold(answer_value: str, kind: str) -> float | str:
    """Gold answer: numeric `float(v.replace(',', '').strip())`; MCQ normalised letter.
    Raises ValueError when a numeric gold does not parse."""
    if check_kind(kind) == MCQ:
        return normalize_mcq(answer_value)
    return float(str(answer_value).replace(",", "").strip())


def extract_nl(completion: str, kind: str) -> Prediction:
    """N-CoT: the text after the *last* answer trigger (the whole text if there is none);
    numeric -> plain `float()` or None; MCQ -> normalised string (never None)."""
    extracted = completion.split(ANSWER_TRIGGER)[-1].strip()
    if check_kind(kind) == MCQ:
        return normalize_mcq(extracted)
    return floatify(extracted)


def program_prediction(status: str, value: float | None, text: str | None, kind: str) -> Prediction:
    """P-CoT: a ProgramResult's fields -> prediction. Numeric: the float of the returned object
    (None when the program failed or returned a non-number). MCQ: `str(result)` normalised; a
    failed program is ReFT's `str(None)` -> "none", not None."""
    ok = status == "ok"
    if check_kind(kind) == MCQ:
        return normalize_mcq(text if ok and text is not None else None)
    return value if ok else None


def is_mcq_letter(pred: Prediction) -> bool:
    return isinstance(pred, str) and len(pred) == 1 and pred in MCQ_OPTIONS


def is_correct(pred: Prediction, gold: float | str, kind: str, tolerance: float = TOLERANCE) -> bool:
    """Numeric: |pred - gold| <= tolerance (absolute; nan/inf never match). MCQ: equality."""
    if pred is None:
        return False
    if check_kind(kind) == MCQ:
        return pred == gold
    if isinstance(pred, str):
        pred = floatify(pred)
        if pred is None:
            return False
    return math.isfinite(pred) and abs(pred - gold) <= tolerance


def completion_from_text(decoded: str) -> str:
    """From a decoded full sequence (prompt + completion, special tokens skipped): strip, take
    the last piece after the CoT trigger, strip. For P-CoT rollouts the piece starts with
    `def solution():` because the header is part of the prefix."""
    return decoded.strip().split(COT_TRIGGER)[-1].strip()
