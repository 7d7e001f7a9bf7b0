"""Answer extraction and comparison: ReFT's exact (strict) semantics."""
import math

import pytest

from reft_jax.reward.answers import (ANSWER_TRIGGER, answer_kind, completion_from_text, extract_nl,
                                     floatify, is_correct, normalize_mcq, parse_gold,
                                     program_prediction)

T = ANSWER_TRIGGER


@pytest.mark.parametrize("text, expected", [
    (f"2 + 2 = 4{T}4", 4.0),
    (f"x{T}18.0", 18.0),
    (f"x{T}18.", 18.0),
    (f"x{T}1e3", 1000.0),
    (f"x{T} -3.5 \n", -3.5),
    (f"x{T}7{T}9", 9.0),  # the last trigger wins
    ("18", 18.0),  # no trigger: the whole text
    (f"x{T}1,000", None),  # no comma removal
    (f"x{T}$18", None),
    (f"x{T}18 dollars", None),
    (f"x{T}18.\nMore text", None),
    ("Therefore, the answer is 18.", None),  # the trigger needs its colon
    (f"x{T}", None),
])
def test_extract_numeric(text, expected):
    assert extract_nl(text, "numeric") == expected


def test_extract_mcq_is_never_none():
    assert extract_nl(f"so{T}C", "mcq") == "c"
    assert extract_nl(f"so{T} 'B' ", "mcq") == "b"
    assert extract_nl("no trigger at all", "mcq") == "no trigger at all"
    assert extract_nl(f"x{T}", "mcq") == ""


def test_inf_and_nan_parse_but_never_match():
    for s in ("inf", "nan"):
        pred = extract_nl(f"x{T}{s}", "numeric")
        assert isinstance(pred, float) and not math.isfinite(pred)
        assert not is_correct(pred, 3.0, "numeric")


def test_gold_parsing_and_comparison():
    assert parse_gold("1,234", "numeric") == 1234.0
    assert parse_gold(" 0.3333333333333333 ", "numeric") == pytest.approx(1 / 3)
    assert parse_gold("A", "mcq") == "a"
    with pytest.raises(ValueError):
        parse_gold("seven", "numeric")
    assert is_correct(10.005, 10.0, "numeric") and not is_correct(10.02, 10.0, "numeric")
    assert is_correct(0.031, 0.036, "numeric")  # absolute 1e-2, loose for small answers
    assert is_correct("c", "c", "mcq") and not is_correct("c)", "c", "mcq")
    assert not is_correct(None, 1.0, "numeric")


def test_program_predictions():
    assert program_prediction("ok", 12.0, "12", "numeric") == 12.0
    assert program_prediction("ok", None, "[1, 2]", "numeric") is None
    assert program_prediction("timeout", None, None, "numeric") is None
    assert program_prediction("ok", None, "'C'", "mcq") == "c"
    assert program_prediction("error", None, None, "mcq") == "none"  # ReFT: str(None)
    assert floatify(True) == 1.0 and floatify("5") == 5.0 and floatify([1]) is None
    assert normalize_mcq(None) == "none"


def test_answer_kind():
    assert answer_kind("gsm8k") == answer_kind("svamp_12") == answer_kind("mathqa-numeric_3") == "numeric"
    assert answer_kind("mathqa") == answer_kind("mathqa_7") == "mcq"
    with pytest.raises(ValueError):
        answer_kind("aqua")


def test_completion_from_text():
    q = "Question:\nHow many?\nAnswer reasoning:\n"
    assert completion_from_text(f"  {q}def solution():\n    return 1\n ") == "def solution():\n    return 1"
    # the last piece: a model that repeats the trigger is scored on its last attempt
    assert completion_from_text(f"{q}first\nAnswer reasoning:\n second ") == "second"
    assert completion_from_text("no trigger") == "no trigger"
