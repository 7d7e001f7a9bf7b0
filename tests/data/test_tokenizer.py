"""The demo tokenizer: exact round trips, one digit per token, fixed special ids."""
from reft_jax.data.synthetic import SyntheticConfig, generate_problems
from reft_jax.data.tokenizer import SPECIAL_TOKENS, train_tokenizer


def test_train_tokenizer():
    problems = generate_problems(SyntheticConfig(num_train=200, num_test=10), "train")
    texts = [t for p in problems for t in (p.question, p.nl_cot, p.program)]
    tok = train_tokenizer(texts, vocab_size=300)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == SPECIAL_TOKENS
    assert len(tok) <= 300
    for text in texts[:50] + ["  odd   spacing\n\n\ttabs ünïcode 🙂 {}"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("x = 12345", add_special_tokens=False)["input_ids"])
    assert pieces[-5:] == list("12345")
    # deterministic: the demo's tokenizer is a function of its corpus
    again = train_tokenizer(texts, vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()
