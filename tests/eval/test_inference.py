"""Voting@k, rerank@k, pass@k and the sample-file reader against plain-Python references written
from the reference text (§7.3, §7.4), on fixed sample sets (ties, invalid answers, MathQA's
single-character rules) and on random ones."""
import itertools
import json
import random

import pytest

from reft_jax.eval import evaluate as ev
from reft_jax.eval import inference as inf
from reft_jax.data.sources import DataError, Example

NUM, MCQ = "numeric", "mcq"


# --- references, written from the text of §7.3 / §7.4 only -----------------------------------------
def ref_vote(preds, kind):
    """Count non-None predictions (MathQA: only single characters) by exact equality; the most
    common wins, ties to the value that appeared first in sample order; none valid -> None."""
    counts, first_seen = {}, []
    for p in preds:
        if p is None or (kind == MCQ and len(p) != 1):
            continue
        if p not in counts:
            counts[p] = 0
            first_seen.append(p)
        counts[p] += 1
    best = None
    for value in first_seen:
        if best is None or counts[value] > counts[best]:
            best = value
    return best


def ref_correct(pred, gold, kind):
    if pred is None:
        return False
    if kind == MCQ:
        return pred == gold.strip().lower()
    return abs(pred - float(gold)) <= 1e-2


def ref_rerank(completions, preds, probs, kind):
    """Per question: unique completions (first occurrence) with a valid prediction (not None;
    MathQA: one alphabetic character); the highest P(label=1), the first on ties; None if none."""
    seen, best, best_p = set(), None, None
    for i, (text, pred) in enumerate(zip(completions, preds)):
        if text in seen:
            continue
        seen.add(text)
        if pred is None:
            continue
        if kind == MCQ and not (len(pred.strip().lower()) == 1 and pred.strip().lower().isalpha()):
            continue
        if best is None or probs[i] > best_p:
            best, best_p = i, probs[i]
    return best


def make_set(item_id, gold, completions, preds, kind):
    return inf.SampleSet(item_id, "q", gold, tuple(completions), tuple(preds),
                         tuple(ref_correct(p, gold, kind) for p in preds))


# --- fixed sample sets --------------------------------------------------------------------------
NUMERIC_CASES = [
    # (gold, predictions, expected vote)
    ("5", [None, 5.0, 3.0, 3.0, 5.0], 5.0),  # 2-2 tie: 5.0 was seen first
    ("5", [3.0, 5.0, 5.0, 3.0], 3.0),  # tie again, now 3.0 first: wrong
    ("5", [None, None, None], None),  # nothing valid: wrong
    ("5", [5.001, 5.002, 4.0, 4.0], 4.0),  # exact equality: 5.001 and 5.002 are different votes
    ("7", [7.0, None, None, None, 8.0], 7.0),  # Nones never win
    ("1", [float("nan"), 1.0, 1.0], 1.0),  # a NaN is a (wrong) vote like any other
]
MCQ_CASES = [
    ("b", ["none", "none", "none", "b"], "b"),  # only single characters count
    ("a", ["ab", "c", "a", "a", "c"], "c"),  # c seen before a, 2-2
    ("c", ["1", "1", "c"], "1"),  # a single non-letter still votes (voting: length rule only)
    ("d", ["none", "{}", "error"], None),
]


@pytest.mark.parametrize("gold,preds,expected", NUMERIC_CASES)
def test_vote_numeric_matches_reference(gold, preds, expected):
    got = ev.majority_vote(preds, NUM)
    assert got == ref_vote(preds, NUM) == expected or (got is None and expected is None)
    s = make_set("svamp_1", gold, [f"c{i}" for i in range(len(preds))], preds, NUM)
    assert inf.vote_correct(s, NUM) == ref_correct(expected, gold, NUM)


@pytest.mark.parametrize("gold,preds,expected", MCQ_CASES)
def test_vote_mcq_single_character_rule(gold, preds, expected):
    assert ev.majority_vote(preds, MCQ) == ref_vote(preds, MCQ) == expected
    s = make_set("mathqa_1", gold, [f"c{i}" for i in range(len(preds))], preds, MCQ)
    assert inf.vote_correct(s, MCQ) == ref_correct(expected, gold, MCQ)


def test_rerank_fixed_sets():
    # duplicates: the second "A" is not a separate candidate even with a higher prob
    comps = ["A", "B", "A", "C", "D"]
    preds = [5.0, None, 5.0, 3.0, 3.0]
    probs = [0.2, 0.99, 0.9, 0.7, 0.7]  # B is invalid; C and D tie -> C (first)
    s = make_set("gsm8k_1", "3", comps, preds, NUM)
    assert inf.rerank_candidates(s, NUM) == [0, 3, 4]
    assert inf.rerank_pick(inf.rerank_candidates(s, NUM), probs) == 3 == ref_rerank(comps, preds, probs, NUM)
    # MathQA: a single non-letter ("1") and a word are not rerank candidates
    comps, preds, probs = ["x", "y", "z", "w"], ["1", "none", " B ", "a"], [0.9, 0.95, 0.5, 0.4]
    s = make_set("mathqa_2", "a", comps, preds, MCQ)
    assert inf.rerank_candidates(s, MCQ) == [2, 3]
    assert inf.rerank_pick(inf.rerank_candidates(s, MCQ), probs) == 2 == ref_rerank(comps, preds, probs, MCQ)
    # nothing valid -> no pick -> wrong
    s = make_set("gsm8k_3", "1", ["p", "q"], [None, None], NUM)
    assert inf.rerank_pick(inf.rerank_candidates(s, NUM), [0.5, 0.6]) is None
    assert inf.summarize([s], NUM, [{0: 0.5, 1: 0.6}])["rerank@2_accuracy"] == 0.0


def test_random_sets_match_references():
    rng = random.Random(0)
    for trial in range(300):
        kind = rng.choice([NUM, MCQ])
        k = rng.randint(1, 12)
        pool = [None, 1.0, 2.0, 2.0000001, 3.0] if kind == NUM else [None, "a", "b", "c", "1", "ab", "none"]
        preds = [rng.choice(pool) for _ in range(k)]
        texts = [rng.choice("uvwxyz") for _ in range(k)]
        # duplicates of a text carry the same prediction, as real samples do
        by_text = {}
        preds = [by_text.setdefault(t, p) for t, p in zip(texts, preds)]
        probs = [rng.choice([0.1, 0.5, 0.5, 0.9]) for _ in range(k)]
        gold = "2" if kind == NUM else "b"
        s = make_set(f"x_{trial}", gold, texts, preds, kind)
        assert ev.majority_vote(preds, kind) == ref_vote(preds, kind)
        assert inf.rerank_pick(inf.rerank_candidates(s, kind), probs) == ref_rerank(texts, preds, probs, kind)


def test_summarize_accuracies():
    sets = [make_set("g_1", "2", ["a", "b", "c"], [2.0, 3.0, 3.0], NUM),  # vote wrong, any right
            make_set("g_2", "4", ["a", "a", "b"], [4.0, 4.0, None], NUM),  # vote right
            make_set("g_3", "9", ["a", "b", "c"], [None, 1.0, 2.0], NUM)]  # nothing right
    probs = [{0: 0.9, 1: 0.1, 2: 0.2}, {0: 0.3}, {1: 0.8, 2: 0.7}]
    out = inf.summarize(sets, NUM, probs)
    assert out["vote@3_accuracy"] == pytest.approx(1 / 3)
    assert out["pass@3"] == pytest.approx(2 / 3)  # the any-correct upper bound
    assert out["pass@1"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert out["rerank@3_accuracy"] == pytest.approx(2 / 3)
    assert out["num_questions"] == 3


def test_pass_at_k_equals_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                flags = [True] * c + [False] * (n - c)
                subsets = list(itertools.combinations(flags, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert inf.pass_at_k(n, c, k) == pytest.approx(expected)
    with pytest.raises(ValueError):
        inf.pass_at_k(3, 4, 1)


# --- sample files -------------------------------------------------------------------------------
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sample_file_is_scored_and_round_trips(tmp_path):
    examples = [Example("svamp_1", "Q one", "7.0"), Example("svamp_2", "Q two", "3")]
    path = _write(tmp_path / "s.jsonl", [
        {"item_id": "svamp_1", "completions": ["x\nTherefore, the answer is: 7", "y"]},
        {"item_id": "svamp_2", "question": "Q two", "answer_value": "3",
         "completions": ["z"], "predictions": [3.0], "correct": [True]}])
    sets = inf.read_sample_file(path, examples,
                                score=lambda c, e: ev.score_completions(c, e, "svamp", "nl"))
    assert sets[0].question == "Q one" and sets[0].predictions == (7.0, None)
    assert sets[0].correct == (True, False) and sets[1].correct == (True,)
    back = inf.read_sample_file(inf.write_sample_file(tmp_path / "back.jsonl", sets))
    assert back == sets


@pytest.mark.parametrize("row,field", [
    ({"completions": ["a"]}, "item_id"),
    ({"item_id": "svamp_9", "answer_value": "1", "completions": ["a"]}, "question"),
    ({"item_id": "svamp_1", "question": "q", "answer_value": "1"}, "completions"),
    ({"item_id": "svamp_1", "completions": "abc"}, "completions"),
    ({"item_id": "svamp_1", "completions": ["a"], "predictions": [1.0]}, "correct"),
    ({"item_id": "svamp_1", "completions": ["a", "b"], "predictions": [1.0], "correct": [True]}, "predictions"),
])
def test_sample_file_errors_name_file_line_and_field(tmp_path, row, field):
    path = _write(tmp_path / "bad.jsonl", [{"item_id": "svamp_1", "completions": ["ok"], "predictions": [1.0],
                                           "correct": [True]}, row])
    with pytest.raises(DataError) as err:
        inf.read_sample_file(path, [Example("svamp_1", "q", "1")])
    assert "bad.jsonl" in str(err.value) and "line 2" in str(err.value) and repr(field) in str(err.value)


def test_sample_file_without_labels_needs_a_scorer(tmp_path):
    path = _write(tmp_path / "s.jsonl", [{"item_id": "svamp_1", "question": "q", "answer_value": "1",
                                         "completions": ["a"]}])
    with pytest.raises(DataError, match="predictions"):
        inf.read_sample_file(path)


def test_reft_sample_output_is_read_as_scored_text(tmp_path):
    """`reft sample` writes the prompt and raw generations (P-CoT: the body after the header)."""
    from reft_jax.data.prompts import program_header, rollout_prefix
    from reft_jax.reward.sandbox import ProgramExecutor

    q = "Tom has 3 apples and buys 4 more. How many apples does Tom have?"
    body = "    apples = 3\n    bought = 4\n    result = apples + bought\n    return result"
    path = _write(tmp_path / "sampled.jsonl", [
        {"prompt": rollout_prefix(q, "python"), "completions": [body, "    return 8"], "item_id": "svamp_1",
         "answer_value": "7.0"},
        {"prompt": rollout_prefix(q, "python"), "completion": body, "item_id": "svamp_2", "answer_value": "7"}])
    with ProgramExecutor(timeout=5.0, workers=1, sympy_workers=0) as executor:
        sets = inf.read_sample_file(path, score=lambda c, e: ev.score_completions(c, e, "svamp", "python", executor))
    assert sets[0].question == q  # parsed from the ReFT prefix: no dataset lookup needed
    assert sets[0].completions[0] == (program_header(q) + body).strip()
    assert sets[0].correct == (True, False) and sets[1].correct == (True,)
