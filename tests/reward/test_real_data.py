"""Real data, 100%: every reference N-CoT in the shared data earns reward 1 through our pipeline
(target built as in training, extracted as in scoring). The P-CoT counterpart (all SVAMP programs
through the sandbox, default policy) is in test_sandbox.py; here, the same programs give the same
outcome under both sandbox policies."""
import json

import pytest

from reft_jax.data.prompts import sft_target
from reft_jax.data.sources import load_dataset, load_gsm8k_jsonl, load_reft_json
from reft_jax.reward.answers import parse_gold
from reft_jax.reward.reward import score_completions
from reft_jax.reward.sandbox import ProgramExecutor


def _all_correct(rows, kind="numeric"):
    scored = score_completions([sft_target(r, "nl") for r in rows], [r.answer_value for r in rows], kind, "nl")
    wrong = [(r.item_id, s.prediction, r.answer_value) for r, s in zip(rows, scored) if s.reward != 1.0]
    assert not wrong, wrong[:5]


def test_svamp_nl_targets_extract_to_gold(data_dir):
    rows = load_reft_json(data_dir / "reft" / "svamp_nl.json")
    assert len(rows) == 3076
    _all_correct(rows)


def test_gsm8k_human_solutions_extract_to_gold(data_dir):
    train = load_gsm8k_jsonl(data_dir / "gsm8k" / "train.jsonl")
    test = load_gsm8k_jsonl(data_dir / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    _all_correct(train)
    _all_correct(test)
    # the converted test set is ReFT's test set, answer for answer
    reft_test = load_dataset("gsm8k", "test", "nl", data_dir)
    assert [r.item_id for r in test] == [r.item_id for r in reft_test]
    assert all(parse_gold(a.answer_value, "numeric") == parse_gold(b.answer_value, "numeric")
               for a, b in zip(test, reft_test))


@pytest.mark.slow  # ~40 s on a loaded 2-core machine: every program runs twice
def test_reference_programs_same_outcome_under_both_policies(data_dir):
    """The only P-CoT reference programs in the shared data (SVAMP train; the test files carry no
    programs) all reach their answers under "reft" and under "strict", identically."""
    rows = json.loads((data_dir / "reft" / "svamp_python_sdp.json").read_text())
    programs = [row["answer_cot"] for row in rows]
    outcomes = {}
    for policy in ("strict", "reft"):
        with ProgramExecutor(policy=policy, cache_size=0) as ex:
            outcomes[policy] = [(r.status, r.value, r.text) for r in ex.run(programs)]
    assert len(programs) == 3043
    changed = [(row["item_id"], a, b) for row, a, b in zip(rows, outcomes["strict"], outcomes["reft"]) if a != b]
    assert not changed, changed[:5]
    wrong = [(row["item_id"], value) for row, (_, value, _) in zip(rows, outcomes["reft"])
             if value is None or abs(value - float(row["answer_value"])) > 1e-2]
    assert not wrong, wrong[:5]
