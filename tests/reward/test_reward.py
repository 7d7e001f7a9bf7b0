"""Reward values (1 / 0.1 / 0) and their options, and the N-CoT batch scorer."""
import pytest

from reft_jax.reward.answers import ANSWER_TRIGGER
from reft_jax.reward.reward import RewardConfig, reward, score_completions


def test_numeric_rewards():
    assert reward(3.0, 3.0, "numeric") == 1.0
    assert reward(3.004, 3.0, "numeric") == 1.0
    assert reward(4.0, 3.0, "numeric") == 0.1
    assert reward(None, 3.0, "numeric") == 0.0
    assert reward(float("nan"), 3.0, "numeric") == 0.1  # parses, so "well-formed but wrong"
    assert reward(4.0, 3.0, "numeric", RewardConfig(partial=0.0)) == 0.0


def test_mcq_garbage_gets_partial_unless_configured():
    assert reward("b", "b", "mcq") == 1.0
    assert reward("c", "b", "mcq") == 0.1
    assert reward("none", "b", "mcq") == 0.1  # a crashed program, as in the official code
    assert reward("the answer is", "b", "mcq") == 0.1
    strict = RewardConfig(mcq_invalid_zero=True)
    assert reward("c", "b", "mcq", strict) == 0.1
    assert reward("none", "b", "mcq", strict) == 0.0
    assert reward("f", "b", "mcq", strict) == 0.0
    assert reward("b", "b", "mcq", strict) == 1.0


def test_score_nl_batch():
    completions = [f"1 + 2 = 3{ANSWER_TRIGGER}3", f"oops{ANSWER_TRIGGER}4", "no answer line"]
    scored = score_completions(completions, ["3", "3", "3.0"], "numeric", "nl")
    assert [s.reward for s in scored] == [1.0, 0.1, 0.0]
    assert [s.status for s in scored] == ["ok", "ok", "error"]
    assert [s.correct for s in scored] == [True, False, False]


def test_score_needs_an_executor_for_programs():
    with pytest.raises(ValueError, match="ProgramExecutor"):
        score_completions(["def solution():\n    return 1"], ["1"], "numeric", "python")
    with pytest.raises(ValueError, match="completions"):
        score_completions(["a"], [], "numeric", "nl")
