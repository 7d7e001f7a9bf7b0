"""ReFT's prompt and target strings, and their tokenisation (reference §2).

The strings are the contract between SFT, rollouts and scoring; they are byte-identical to the
official code. Tokenisation follows it too: prompt and target are tokenised separately (for
SentencePiece tokenizers the target then gets its own leading "▁"), no BOS unless the tokenizer
family needs one, one EOS appended and trained. Pad / EOS ids always come from the tokenizer
(the official `main` hard-codes 1 / 2, which only fits Galactica and CodeLlama).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from reft_jax.data.formats import (ANSWER_TRIGGER, COT_TRIGGER, ENGINES, HEADER_NEWLINE,  # noqa: F401
                                   INSTRUCTION, Example, check_engine)

if TYPE_CHECKING:  # numpy-backed; imported lazily so the reward path stays light
    from reft_jax.data.batches import Encoded


def sft_prompt(question: str) -> str:
    """`Question:\\n{q}\\nAnswer reasoning:\\n` (both engines; also the SFT-eval and verifier prefix)."""
    return INSTRUCTION + question.strip() + COT_TRIGGER


def sft_target(example: "Example", engine: str) -> str:
    """The CoT; N-CoT gets ReFT's answer line appended. P-CoT: the whole program."""
    check_engine(engine)
    if example.answer_cot is None:
        raise ValueError(f"{example.item_id}: no answer_cot (a test row?) to build a target from")
    cot = example.answer_cot.strip()
    if engine == "nl":
        cot = cot + ANSWER_TRIGGER + example.answer_value.strip()
    return cot


def program_header(question: str, newline: bool = True) -> str:
    """`def solution():\\n    \"\"\"{q}\"\"\"` (+ newline): the P-CoT rollout continues from here."""
    return 'def solution():\n    """' + question + '"""' + ("\n" if newline else "")


def rollout_prefix(question: str, engine: str, newline: bool = True) -> str:
    """Generation prefix for ReFT / online self-training rollouts and sampling. `newline`: end the
    P-CoT header with its newline (ReFT `main`); token-level callers pass `header_newline(tok)`."""
    check_engine(engine)
    prefix = sft_prompt(question)
    if engine == "python":
        prefix += program_header(question.strip(), newline)
    return prefix


# --- tokenisation -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    bos: int | None


def special_ids(tokenizer: Any) -> SpecialIds:
    """Pad / EOS / BOS ids from the tokenizer. A tokenizer without a pad token pads with EOS
    (batches carry explicit masks, so pad == eos is harmless)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token")
    pad = tokenizer.pad_token_id
    return SpecialIds(pad=eos if pad is None else pad, eos=eos, bos=tokenizer.bos_token_id)


def needs_bos(tokenizer: Any) -> bool:
    """Families trained to always see BOS first (ReFT's newer branch: Gemma)."""
    names = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')}".lower()
    return "gemma" in names and tokenizer.bos_token_id is not None


def _bos(tokenizer: Any, add_bos: bool | None) -> list[int]:
    want = needs_bos(tokenizer) if add_bos is None else add_bos
    if want and tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    return [tokenizer.bos_token_id] if want else []


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_sft(tokenizer: Any, example: "Example", engine: str, max_len: int | None,
               add_bos: bool | None = None) -> "Encoded":
    """[BOS?] + tok(prompt) + tok(target) + [EOS], truncated to `max_len` keeping the head
    (None: whole, for `data.lengths.fit_examples` to apply `data.overlong`).
    `n_prompt` counts the masked (prompt) positions."""
    from reft_jax.data.batches import Encoded
    import numpy as np

    prompt = _bos(tokenizer, add_bos) + tokenize(tokenizer, sft_prompt(example.question))
    target = tokenize(tokenizer, sft_target(example, engine)) + [special_ids(tokenizer).eos]
    ids = (prompt + target)[:max_len]
    return Encoded(ids=np.asarray(ids, np.int32), n_prompt=min(len(prompt), len(ids)))


@functools.lru_cache(maxsize=16)
def header_newline(tokenizer: Any, mode: str = "auto") -> bool:
    """Whether a P-CoT rollout prefix ends with the header's newline (`data.header_newline`:
    "always" as ReFT `main`, "never", or "auto" for this tokenizer, below).

    SFT trains on the program tokenised as a whole; a rollout continues from its header. ReFT's
    `main` appends `\"\"\"\n`, right for CodeLlama, whose newline is a token of its own. GPT-2-style
    BPEs (SmolLM2, Llama 3, Qwen2, the demo's) merge that newline with the next line's indent, so
    a prefix ending in a bare newline is a token sequence SFT never showed. As ReFT's newer branch
    ("decide by tokenizer"): keep the newline only where a token boundary follows it."""
    if mode != "auto":
        if mode not in HEADER_NEWLINE:
            raise ValueError(f"header_newline must be one of {HEADER_NEWLINE}, got {mode!r}")
        return mode == "always"
    head = program_header("q")
    ids = tokenize(tokenizer, head + "    x = 1\n")
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i], clean_up_tokenization_spaces=False)
        if text == head:
            return True
        if len(text) > len(head):
            return False
    return False


def encode_prefix(tokenizer: Any, question: str, engine: str, max_len: int = 300,
                  newline: bool | None = None, add_bos: bool | None = None) -> list[int]:
    """Rollout prefix ids, truncated to `max_len` keeping the head (ReFT: a too-long prompt loses
    its end, trigger included). `newline` None: as `header_newline(tokenizer)`."""
    if newline is None:
        newline = header_newline(tokenizer)
    ids = _bos(tokenizer, add_bos) + tokenize(tokenizer, rollout_prefix(question, engine, newline))
    return ids[:max_len]


def encode_eval_prefix(tokenizer: Any, question: str, max_len: int = 1024,
                       add_bos: bool | None = None) -> list[int]:
    """SFT-evaluation / verifier prefix (no program header, both engines)."""
    return (_bos(tokenizer, add_bos) + tokenize(tokenizer, sft_prompt(question)))[:max_len]
