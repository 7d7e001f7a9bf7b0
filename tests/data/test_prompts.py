"""ReFT's prompt strings and their tokenisation, with a real (small, locally trained) tokenizer."""
import numpy as np
import pytest

from reft_jax.data.prompts import (ANSWER_TRIGGER, COT_TRIGGER, INSTRUCTION, encode_eval_prefix,
                                   encode_prefix, encode_sft, header_newline, needs_bos, rollout_prefix,
                                   sft_prompt, sft_target, special_ids, tokenize)
from reft_jax.data.sources import Example
from reft_jax.data.synthetic import SyntheticConfig, generate_problems
from reft_jax.data.tokenizer import train_tokenizer
from reft_jax.reward.answers import completion_from_text, extract_nl

EX_NL = Example("svamp_1", "  How many apples?  ", " 203.0 ", "Add them.\nTherefore, the answer is 203.")
EX_PY = Example("svamp_2", "How many?", "5", 'def solution():\n    """How many?"""\n    result = 5\n    return result\n')


@pytest.fixture(scope="module")
def tokenizer():
    problems = generate_problems(SyntheticConfig(num_train=300, num_test=10), "train")
    texts = [t for p in problems for t in (p.question, p.nl_cot, p.program)]
    texts += [INSTRUCTION + COT_TRIGGER + ANSWER_TRIGGER, EX_NL.answer_cot, EX_PY.answer_cot]
    return train_tokenizer(texts, vocab_size=300)


def test_strings_are_reft_exact():
    assert INSTRUCTION == "Question:\n" and COT_TRIGGER == "\nAnswer reasoning:\n"
    assert ANSWER_TRIGGER == "\nTherefore, the answer is: "
    assert sft_prompt(EX_NL.question) == "Question:\nHow many apples?\nAnswer reasoning:\n"
    assert sft_target(EX_NL, "nl") == "Add them.\nTherefore, the answer is 203.\nTherefore, the answer is: 203.0"
    assert sft_target(EX_PY, "python") == EX_PY.answer_cot.strip()
    assert rollout_prefix(EX_NL.question, "nl") == sft_prompt(EX_NL.question)
    assert rollout_prefix("How many?", "python") == (
        'Question:\nHow many?\nAnswer reasoning:\ndef solution():\n    """How many?"""\n')
    assert rollout_prefix("How many?", "python", newline=False).endswith('"""How many?"""')
    with pytest.raises(ValueError):
        sft_target(Example("svamp_3", "q", "1"), "nl")  # a test row has no CoT
    with pytest.raises(ValueError):
        rollout_prefix("q", "latex")


def test_target_round_trips_through_scoring():
    """What SFT teaches is what the scorer reads back."""
    full = sft_prompt(EX_NL.question) + sft_target(EX_NL, "nl")
    assert extract_nl(completion_from_text(full), "numeric") == 203.0


def test_encode_sft(tokenizer):
    enc = encode_sft(tokenizer, EX_NL, "nl", max_len=512)
    prompt = tokenize(tokenizer, sft_prompt(EX_NL.question))
    target = tokenize(tokenizer, sft_target(EX_NL, "nl"))
    ids = special_ids(tokenizer)
    # separate tokenisation, no BOS, one EOS at the end (trained: it is past n_prompt)
    assert enc.ids.tolist() == prompt + target + [ids.eos]
    assert enc.n_prompt == len(prompt) and enc.ids.dtype == np.int32
    assert ids.bos not in enc.ids.tolist() and enc.ids.tolist().count(ids.eos) == 1
    assert tokenizer.decode(enc.ids[:enc.n_prompt]) == sft_prompt(EX_NL.question)
    short = encode_sft(tokenizer, EX_NL, "nl", max_len=5)  # truncation keeps the head
    assert short.ids.tolist() == prompt[:5] and short.n_prompt == 5
    with_bos = encode_sft(tokenizer, EX_NL, "nl", max_len=512, add_bos=True)
    assert with_bos.ids[0] == ids.bos and with_bos.n_prompt == enc.n_prompt + 1


def test_encode_prefixes(tokenizer):
    full = encode_prefix(tokenizer, EX_PY.question, "python", max_len=300)
    assert tokenizer.decode(full) == rollout_prefix(EX_PY.question, "python", newline=header_newline(tokenizer))
    assert encode_prefix(tokenizer, EX_PY.question, "python", max_len=7) == full[:7]
    assert tokenizer.decode(encode_eval_prefix(tokenizer, EX_PY.question)) == sft_prompt(EX_PY.question)


def _newline_apart_tokenizer():
    """A tokenizer that keeps every newline a token of its own (as SentencePiece's <0x0A> in
    CodeLlama, for which ReFT's header with its trailing newline was written)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([EX_PY.answer_cot * 3, sft_prompt("How many?")], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("which", ["synthetic BPE", "newline apart", "SmolLM2"])
def test_pcot_rollout_prefix_is_the_head_of_a_training_sequence(which, tokenizer):
    """The P-CoT rollout prefix ends inside the program. Its tokens must be exactly the head of
    what SFT trained on (prompt and program tokenised apart), or the policy starts from a
    sequence it never saw: GPT-2-style BPEs (SmolLM2, the demo's) merge the header's newline
    with the next line's indent, so ReFT `main`'s header newline would end the prefix on a token
    never seen there. It is kept only where the tokenizer keeps it apart (ReFT's newer branch)."""
    if which == "newline apart":
        tok, expect = _newline_apart_tokenizer(), True
    elif which == "SmolLM2":
        from reft_jax.model.io import smollm2_gguf_path
        from reft_jax.model.tokenizer_io import load_tokenizer

        tok, expect = load_tokenizer(smollm2_gguf_path()), False
    else:
        tok, expect = tokenizer, False
    assert header_newline(tok) is expect
    for ex in (EX_PY, Example("svamp_3", "Tom has 3 apples. How many apples?", "3",
                              'def solution():\n    """Tom has 3 apples. How many apples?"""\n    apples = 3\n'
                              '    result = apples\n    return result')):
        head = encode_prefix(tok, ex.question, "python")
        trained = tokenize(tok, sft_prompt(ex.question)) + tokenize(tok, sft_target(ex, "python"))
        assert head == trained[:len(head)], (tok.convert_ids_to_tokens(head[-3:]),
                                             tok.convert_ids_to_tokens(trained[len(head) - 3:len(head) + 1]))
        assert tok.decode(head) == rollout_prefix(ex.question, "python", newline=expect)
    # N-CoT prefixes do not depend on it
    assert encode_prefix(tok, "How many?", "nl") == tokenize(tok, sft_prompt("How many?"))
    # data.header_newline forces either ending (always: ReFT main)
    from reft_jax.rollout.engine import encode_prefixes

    for mode, ending in (("always", '"""\n'), ("never", '"""'), ("auto", '"""\n' if expect else '"""')):
        pre = encode_prefixes(tok, [EX_PY.question], "python", 300, 0, bucket=1, header=mode)
        assert tok.decode(pre.tokens[0][pre.mask[0]]).endswith('?' + ending), mode


def test_header_newline_setting_is_validated():
    from reft_jax.data.sources import DataConfig

    with pytest.raises(ValueError, match="header_newline must be one of .* got 'yes'"):
        DataConfig(header_newline="yes")


def test_special_ids_come_from_the_tokenizer(tokenizer):
    ids = special_ids(tokenizer)
    assert (ids.pad, ids.eos, ids.bos) == (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert (ids.pad, ids.eos) != (1, 2)  # not ReFT's hard-coded Galactica ids

    class NoPad:
        eos_token_id, pad_token_id, bos_token_id, name_or_path = 7, None, None, "x"

    assert special_ids(NoPad()).pad == 7
    assert not needs_bos(tokenizer)

    class Gemma(NoPad):
        bos_token_id, name_or_path = 2, "google/gemma-2b"

    assert needs_bos(Gemma())
