"""Real data, 100%: every reference N-CoT in the shared data earns reward 1 through our pipeline
(target built as in training, extracted as in scoring). The P-CoT counterpart (all SVAMP programs
through the sandbox) is in test_sandbox.py."""
from reft_jax.data.prompts import sft_target
from reft_jax.data.sources import load_dataset, load_gsm8k_jsonl, load_reft_json
from reft_jax.reward.answers import parse_gold
from reft_jax.reward.reward import score_completions


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
