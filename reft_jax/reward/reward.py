"""ReFT's score: 1 for a correct answer, 0.1 ("partial") for a wrong but well-formed one, 0 for
nothing usable (reference §4), plus the batch scorer the PPO loop and `reft score` share.

Official semantics by default: the partial reward also applies to MathQA multiple choice, where a
prediction is never None (garbage and crashed programs get 0.1). `mcq_invalid_zero=True` gives 0
to any MCQ prediction that is not a single option letter a-e (the paper's stated intent).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from reft_jax.data.formats import ANSWER_TRIGGER
from reft_jax.reward.answers import (MCQ, TOLERANCE, Prediction, check_kind, extract_nl,
                                     is_correct, is_mcq_letter, parse_gold, program_prediction)

if TYPE_CHECKING:
    from reft_jax.reward.sandbox import ProgramExecutor


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward options (a config section)."""

    correct: float = 1.0
    partial: float = 0.1  # 0.0 = the paper's "no partial reward" ablation
    mcq_invalid_zero: bool = False  # ReFT code: False (MCQ garbage gets the partial reward)
    tolerance: float = TOLERANCE  # absolute, numeric datasets


def reward(prediction: Prediction, gold: float | str, kind: str,
           config: RewardConfig | None = None) -> float:
    """Score of one prediction against a parsed gold answer (see `answers.parse_gold`)."""
    cfg = config or RewardConfig()
    if prediction is None:
        return 0.0
    if check_kind(kind) == MCQ and cfg.mcq_invalid_zero and not is_mcq_letter(prediction):
        return 0.0
    if is_correct(prediction, gold, kind, cfg.tolerance):
        return cfg.correct
    return cfg.partial


@dataclasses.dataclass(frozen=True)
class Scored:
    """One scored completion. status: the executor's (ok / error / timeout / rejected) for
    P-CoT; for N-CoT "ok" when an answer was extracted, "error" when none parsed."""

    prediction: Prediction
    status: str
    reward: float
    correct: bool
    detail: str = ""


def score_completions(completions: Sequence[str], golds: Sequence[str | float], kind: str,
                      engine: str, executor: "ProgramExecutor | None" = None,
                      config: RewardConfig | None = None) -> list[Scored]:
    """Score completions (the text after the CoT trigger; for P-CoT the program from
    `def solution():`) against gold answers (raw `answer_value` strings or parsed values).
    P-CoT needs an executor; programs run as one batch."""
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    cfg = config or RewardConfig()
    parsed = [parse_gold(g, kind) for g in golds]
    if engine == "python":
        if executor is None:
            raise ValueError("P-CoT scoring needs a ProgramExecutor")
        outcomes = [(program_prediction(r.status, r.value, r.text, kind), r.status, r.detail)
                    for r in executor.run(list(completions))]
    elif engine == "nl":
        outcomes = []
        for c in completions:
            pred = extract_nl(c, kind)
            why = "no number after the answer trigger" if ANSWER_TRIGGER in c else "no answer trigger"
            outcomes.append((pred, "ok", "") if pred is not None else (None, "error", why))
    else:
        raise ValueError(f"engine must be 'nl' or 'python', got {engine!r}")
    return [Scored(pred, status, reward(pred, g, kind, cfg), is_correct(pred, g, kind, cfg.tolerance), detail)
            for (pred, status, detail), g in zip(outcomes, parsed)]
