"""A small byte-level BPE tokenizer trained on our own texts: the demo's tokenizer, and the
tokenizer the data tests use (no downloads, no torch).

Byte-level so that any text round-trips exactly (P-CoT indentation and newlines matter); digits
are split one per token, as in SmolLM2/Llama tokenizers, so arithmetic is learnable by a tiny
model; special tokens `<pad>`, `<eos>`, `<bos>`, `<unk>` get ids 0-3.
"""
from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", clean_up_tokenization_spaces=False,
    )
