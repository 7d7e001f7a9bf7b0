"""Evaluation: ReFT's prefixes and text reconstruction, scoring, voting, and the metric plumbing."""
import json

import jax
import pytest

from reft_jax.eval import evaluate as ev
from reft_jax.data.prompts import COT_TRIGGER, INSTRUCTION, program_header
from reft_jax.data.sources import Example
from reft_jax.reward.sandbox import ProgramExecutor
from reft_jax.train.run import DataConfig, EvalConfig

Q = "Tom has 3 apples and buys 4 more. How many apples does Tom have?"
EX = Example("svamp_1", Q, "7.0")
BODY = "    apples = 3\n    bought = 4\n    result = apples + bought\n    return result"


def test_prefixes_follow_reft():
    assert ev.eval_prefix(Q, "python", "sft") == INSTRUCTION + Q + COT_TRIGGER
    assert ev.eval_prefix(Q, "nl", "rollout") == INSTRUCTION + Q + COT_TRIGGER
    assert ev.eval_prefix(Q, "python", "rollout") == INSTRUCTION + Q + COT_TRIGGER + program_header(Q)
    with pytest.raises(ValueError, match="prefix"):
        ev.eval_prefix(Q, "nl", "chat")


def test_pcot_rollout_prefixes_end_as_the_tokenizer_needs():
    """Evaluation builds P-CoT rollout prefixes with the header rule of `data.header_newline`;
    the program scored is the same either way."""
    from reft_jax.data.tokenizer import train_tokenizer

    tok = train_tokenizer([program_header(Q) + BODY] * 4, vocab_size=300)  # byte-level: merges "\n   "
    auto = ev.eval_prefixes([EX], DataConfig(engine="python"), "rollout", tok)[0]
    main = ev.eval_prefixes([EX], DataConfig(engine="python", header_newline="always"), "rollout", tok)[0]
    assert main == ev.eval_prefix(Q, "python", "rollout") and auto == main[:-1]
    assert ev.scored_text(auto, "\n" + BODY) == ev.scored_text(main, BODY) == (program_header(Q) + BODY).strip()
    assert ev.eval_prefixes([EX], DataConfig(engine="nl"), "rollout", None) == [ev.eval_prefix(Q, "nl", "rollout")]


def test_scored_text_rebuilds_the_program_from_the_rollout_header():
    rollout = ev.eval_prefix(Q, "python", "rollout")
    assert ev.scored_text(rollout, BODY + "\n") == (program_header(Q) + BODY).strip()
    sft = ev.eval_prefix(Q, "python", "sft")
    assert ev.scored_text(sft, program_header(Q) + BODY).startswith("def solution():")
    # a generation that repeats the trigger: the text after the last one is scored, as ReFT
    assert ev.scored_text(sft, "junk" + COT_TRIGGER + "7 + 1 = 8") == "7 + 1 = 8"


def test_score_completions_nl_and_python():
    nl = ev.score_completions(["3 + 4 = 7\nTherefore, the answer is: 7", "1 + 7 = 8\nTherefore, the answer is: 8",
                               "no answer"], [EX] * 3, "svamp", "nl")
    assert [tuple(s) for s in nl] == [(7.0, True, 1.0), (8.0, False, 0.1), (None, False, 0.0)]
    with ProgramExecutor(timeout=5.0, workers=1, sympy_workers=0) as executor:
        py = ev.score_completions([program_header(Q) + BODY, "def solution():\n    return 1/0"],
                                  [EX, EX], "svamp_1", "python", executor)
    assert [(s.correct, s.reward) for s in py] == [(True, 1.0), (False, 0.0)]
    pred, correct, reward = py[0]
    assert pred == 7.0


def test_majority_vote_ties_go_to_the_first_seen():
    assert ev.majority_vote([None, 2.0, 3.0, 3.0, 2.0], "numeric") == 2.0
    assert ev.majority_vote([None, 3.0, 2.0, 2.0], "numeric") == 2.0
    assert ev.majority_vote([None, None], "numeric") is None
    assert ev.majority_vote(["none", "b", "none", "none"], "mcq") == "b"  # only single letters count


def test_evaluate_aggregates_greedy_votes_and_pass(monkeypatch):
    """The plumbing around the generator: greedy top-1, voting@k, pass@k and the records."""
    rows = [Example("synthetic_0", "q0", "5"), Example("synthetic_1", "q1", "6")]
    answers = {"greedy": {"q0": "5", "q1": "0"},
               "vote": {"q0": ["4", "5", "5"], "q1": ["1", "6", "2"]}}
    calls = []

    def fake_generate(params, model_config, tokenizer, prompts, sample_config, rng, batch_size, mesh, show,
                      max_prompt_len, clean_up_spaces=False):
        kind = "greedy" if sample_config.greedy else "vote"
        calls.append((kind, sample_config, clean_up_spaces))
        out = []
        for prompt in prompts:
            picks = [answers[kind][prompt.split("\n")[1]]] if kind == "greedy" else answers[kind][prompt.split("\n")[1]]
            out.append([f"x\nTherefore, the answer is: {p}" for p in picks])
        return out

    monkeypatch.setattr(ev, "generate_for_prefixes", fake_generate)
    result = ev.evaluate(None, None, None, rows, DataConfig(dataset="synthetic", engine="nl"),
                         EvalConfig(max_new_tokens=16), jax.random.key(0), None, vote_k=3)
    m = result["metrics"]
    assert m["accuracy"] == 0.5 and m["num_examples"] == 2 and m["mean_reward"] == pytest.approx(0.55)
    assert m["vote@3_accuracy"] == 0.5 and m["pass@3"] == 1.0
    greedy_cfg, vote_cfg = calls[0][1], calls[1][1]
    assert greedy_cfg.greedy and not vote_cfg.greedy and vote_cfg.top_k == 50 and vote_cfg.temperature == 1.0
    assert vote_cfg.n == 3
    # ReFT's evaluation decodes top-1 with clean_up_tokenization_spaces, sampling.py without
    assert calls[0][2] is True and calls[1][2] is False
    first = result["predictions"][0]
    assert (first["item_id"], first["prediction"], first["correct"], first["vote"]) == ("synthetic_0", 5.0, True, 5.0)
    json.dumps(result["predictions"])  # JSON-able as it is


def test_write_predictions_is_jsonl(tmp_path):
    path = ev.write_predictions(tmp_path / "sub" / "p.jsonl", [{"a": 1}, {"a": None}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": None}]


def test_completions_are_decoded_in_context_keeping_the_first_indent():
    """A SentencePiece-style decoder drops a text's leading space: decoded alone, the body of a
    P-CoT program would lose one space of its first indentation (and fail to run)."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, ":": 2, "\n": 3, "▁▁▁": 4, "▁x": 5, "▁=": 6, "▁1": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    body = np.array([4, 5, 6, 7, 1], np.int32)
    assert tokenizer.decode(body, skip_special_tokens=True) != "    x = 1"  # the loss being avoided
    assert ev.in_context_texts(tokenizer, [2, 3], [body, body[:2]]) == ["    x = 1", "    x"]


def test_in_context_texts_clean_up_spaces_as_transformers_4():
    """ReFT's evaluation decodes with clean_up_tokenization_spaces=True (transformers 4.x applied it
    to every tokenizer; 5.x skips it for BPE ones, so we apply it ourselves)."""
    from reft_jax.data.tokenizer import train_tokenizer
    from reft_jax.rollout.generation import clean_up_spaces

    assert clean_up_spaces("It is 5 . Tom ' s , isn 't? He 's a b ! c ?") == "It is 5. Tom's, isn 't? He's a b! c?"
    tok = train_tokenizer(["Question:\nHow many ?\nAnswer reasoning:\n", "5 + 2 = 7 .", "the answer is: 7 ."], 300)
    prompt = tok("Question:\nHow many ?\nAnswer reasoning:\n", add_special_tokens=False)["input_ids"]
    completion = tok("5 + 2 = 7 , so 7 .", add_special_tokens=False)["input_ids"]
    assert ev.in_context_texts(tok, prompt, [completion]) == ["5 + 2 = 7 , so 7 ."]
    assert ev.in_context_texts(tok, prompt, [completion], clean_up_spaces=True) == ["5 + 2 = 7, so 7."]
