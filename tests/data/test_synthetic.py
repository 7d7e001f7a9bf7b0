"""The synthetic generator: deterministic, well-formed, held out by construction, and every
annotation reaches its answer through the real scoring pipeline."""
import dataclasses
import re

import pytest

from reft_jax.data.prompts import sft_target
from reft_jax.data.sources import load_dataset, load_reft_json
from reft_jax.data.synthetic import SyntheticConfig, generate, generate_problems, write_reft_files
from reft_jax.reward.reward import score_completions
from reft_jax.reward.sandbox import ProgramExecutor

SMALL = SyntheticConfig(num_train=400, num_test=60)


def test_deterministic_and_independent_of_other_split():
    a = generate_problems(SMALL, "train")
    assert a == generate_problems(SMALL, "train")
    assert a == generate_problems(dataclasses.replace(SMALL, num_test=5), "train")
    assert a != generate_problems(dataclasses.replace(SMALL, seed=1), "train")
    assert len({p.question for p in a}) == len(a) == 400


def test_well_formed():
    for p in generate_problems(SMALL, "train") + generate_problems(SMALL, "test"):
        assert isinstance(p.answer, int) and 0 <= p.answer <= SMALL.max_value
        lines = p.nl_cot.split("\n")
        assert len(lines) == len(p.ops)
        assert all(re.fullmatch(r"\d+ [-+*/] \d+ = \d+", line) for line in lines)
        assert lines[-1].endswith(f"= {p.answer}")
        code = p.program.split("\n")
        assert code[0] == "def solution():" and code[1] == f'    """{p.question}"""'
        assert code[-2].startswith("    result = ") and code[-1] == "    return result"
        assert "" not in code  # no blank line (ReFT truncates there)


def test_test_split_is_held_out():
    train = generate_problems(SMALL, "train")
    test = generate_problems(SMALL, "test")
    held = set(SMALL.held_out_pairs)
    assert all(len(p.ops) <= SMALL.train_steps[1] and not set(zip(p.ops, p.ops[1:])) & held for p in train)
    assert all(len(p.ops) > SMALL.train_steps[1] or set(zip(p.ops, p.ops[1:])) & held for p in test)
    assert any(len(p.ops) <= SMALL.train_steps[1] for p in test)  # some are recombinations
    assert not {p.question for p in train} & {p.question for p in test}


def test_knobs():
    cfg = SyntheticConfig(num_train=100, num_test=20, train_steps=(3, 3), test_steps=(4, 4),
                          operations=("add", "div"), held_out_pairs=(), start_range=(10, 50),
                          operand_range=(2, 5), max_value=500)
    for p in generate_problems(cfg, "train"):
        assert len(p.ops) == 3 and set(p.ops) <= {"add", "div"}
    assert all(len(p.ops) == 4 for p in generate_problems(cfg, "test"))
    with pytest.raises(ValueError, match="held out"):
        SyntheticConfig(test_steps=(1, 2), held_out_pairs=()).validate()
    with pytest.raises(ValueError):
        SyntheticConfig(operations=("pow",)).validate()


def test_annotations_reach_their_answers():
    train_nl = generate(SMALL, "train", "nl")
    scored = score_completions([sft_target(r, "nl") for r in train_nl], [r.answer_value for r in train_nl],
                               "numeric", "nl")
    assert all(s.reward == 1.0 for s in scored)
    train_py = generate(SMALL, "train", "python")[:150] + [
        dataclasses.replace(r, answer_cot=p.program) for r, p in
        zip(generate(SMALL, "test", "python"), generate_problems(SMALL, "test"))]
    with ProgramExecutor(timeout=2.0, workers=1) as ex:
        scored = score_completions([r.answer_cot for r in train_py], [r.answer_value for r in train_py],
                                   "numeric", "python", ex)
    assert all(s.reward == 1.0 for s in scored), [s for s in scored if s.reward != 1.0][:3]


def test_reft_format_files(tmp_path):
    paths = write_reft_files(SMALL, tmp_path)
    nl, py, test = (load_reft_json(p) for p in paths)
    assert (len(nl), len(py), len(test)) == (400, 400, 60)
    assert test[0].answer_cot is None and test[0].item_id == "synthetic_400"
    assert [r.answer_value for r in nl] == [r.answer_value for r in py]
    assert len(load_dataset("synthetic", "test", "nl")) == SyntheticConfig().num_test
