"""Host-side generation: prompts (text) in, completions (text and tokens) out.

The thin shell around `reft_jax.rollout.sampler.sample`: tokenise as ReFT does (no special tokens
unless the tokenizer family needs a BOS), truncate long prompts keeping the head (ReFT §2),
group prompts of similar length, pad each batch to a length bucket and to the full batch size
(dummy rows) so a whole evaluation compiles a handful of programs, sample, and decode only the
completion tokens.

Every prompt gets its own PRNG key from its index in `prompts`, so its samples do not depend on
the batch size, the sorting, or which other prompts share its batch.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import jax
import numpy as np

from reft_jax.data.batches import left_pad
from reft_jax.data.prompts import needs_bos
from reft_jax.model.config import ModelConfig
from reft_jax.rollout.sampler import Rollout, SampleConfig, prompt_keys, sample

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
    """Completions of `generate`, indexed [prompt][sample]."""

    texts: list[list[str]]
    prompt_ids: list[list[int]]  # after truncation
    completion_ids: list[list[np.ndarray]]  # int32, EOS included, no padding
    logprobs: list[list[np.ndarray]]  # float32, unwarped (see `Rollout`)
    # with keep_rollouts, per batch: (indices of its prompts, host Rollout without dummy rows);
    # rows of the prompt at batch position j are [j*n, (j+1)*n)
    batches: list[tuple[np.ndarray, Rollout]]
    num_truncated: int
    num_tokens: int
    seconds: float


# transformers' `clean_up_tokenization` (4.x applied it to every tokenizer when a decode asked for
# `clean_up_tokenization_spaces=True`, as ReFT's evaluation does; 5.x silently skips it for BPE
# tokenizers, i.e. Llama, CodeLlama, SmolLM2 and ours, so the flag alone no longer reproduces it)
CLEAN_UP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_spaces(text: str) -> str:
    """The text as transformers 4.x decoded it with `clean_up_tokenization_spaces=True`."""
    for old, new in CLEAN_UP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def with_tokenizer_ids(config: SampleConfig, tokenizer: Any) -> SampleConfig:
    """Fill EOS ids and the pad id from the tokenizer where the config leaves them unset (a
    tokenizer without a pad token pads with EOS; without EOS, rows stop only at the budget)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return dataclasses.replace(config, eos_ids=config.eos_ids or (() if eos is None else (eos,)),
                               pad_id=(pad or 0) if config.pad_id is None else config.pad_id)


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Sequence[int]], max_prompt_len: int | None = None,
                   add_bos: bool | None = None) -> tuple[list[list[int]], int]:
    """(token ids, number truncated). Text gets no special tokens (ReFT), except a BOS for
    families that need one (`add_bos=None`); a prompt given as token ids is used as is. Prompts
    longer than `max_prompt_len` keep their head."""
    bos = [tokenizer.bos_token_id] if (needs_bos(tokenizer) if add_bos is None else add_bos) else []
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids = [bos + list(next(encoded)) if isinstance(p, str) else list(p) for p in prompts]
    truncated = 0
    if max_prompt_len is not None:
        truncated = sum(len(i) > max_prompt_len for i in ids)
        ids = [i[:max_prompt_len] for i in ids]
    return ids, truncated


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Prompt indices per batch, longest first: similar lengths share a batch (less padding) and
    the largest shapes compile and allocate first."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def bucket_width(longest: int, bucket: int) -> int:
    """Prefix width: the longest prompt rounded up to a multiple of `bucket`."""
    return max(bucket, math.ceil(longest / bucket) * bucket)


def generate(params: Any, model_config: ModelConfig, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
             sample_config: SampleConfig, rng: jax.Array, batch_size: int = 8, mesh=None,
             progress: bool = True, max_prompt_len: int | None = None, prefix_bucket: int = 64,
             add_bos: bool | None = None, keep_rollouts: bool = False,
             clean_up: bool = False) -> Generation:
    """Sample `sample_config.n` completions per prompt (text, or token ids used as given); text
    and token-level outputs.

    `batch_size` counts prompts (a batch has batch_size * n rows); with a mesh it must be a
    multiple of the mesh's data*fsdp size. EOS / pad ids default to the tokenizer's. With
    `max_total_len` the budget follows each batch's longest prompt, and batches group prompts
    of similar length (ReFT's were random). An empty prompt gets an empty completion.
    `keep_rollouts` also returns the per-batch `Rollout`s (large for many samples).
    `clean_up` applies transformers' `clean_up_tokenization_spaces` to the completion
    texts (" ." -> ".", " ," -> ",", " n't" -> "n't", ...; `clean_up_spaces()`): off, as ReFT's
    rollouts and `sampling.py` decode; ReFT's evaluation turns it on (`evaluate.in_context_texts`).
    """
    config = with_tokenizer_ids(sample_config, tokenizer)
    ids, truncated = encode_prompts(tokenizer, prompts, max_prompt_len, add_bos)
    if truncated:
        log.warning("%d of %d prompts were longer than %d tokens and lost their end (ReFT keeps the head)",
                    truncated, len(ids), max_prompt_len)
    n = config.n
    keys = prompt_keys(rng, len(ids)) if ids else None
    texts: list[list[str]] = [[] for _ in ids]
    comp_ids: list[list[np.ndarray]] = [[] for _ in ids]
    logps: list[list[np.ndarray]] = [[] for _ in ids]
    batches: list[tuple[np.ndarray, Rollout]] = []
    total_tokens, start = 0, time.perf_counter()
    bar = _progress_bar(len(ids), progress)
    for idx in plan_batches([len(i) for i in ids], batch_size):
        rows = [ids[i] for i in idx]
        width = bucket_width(max(len(r) for r in rows), prefix_bucket)
        tokens, mask = left_pad(rows, width, config.pad_id, batch_size)
        # dummy rows (all-False mask) emit nothing; their keys are never used for output
        batch_keys = keys[np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])]
        rollout = sample(params, tokens, mask, batch_keys, model_config, config, mesh=mesh)
        host = Rollout(*(None if x is None else np.asarray(x)[: len(idx) * n] for x in rollout))
        if keep_rollouts:
            batches.append((idx, host))
        for j, prompt in enumerate(idx):
            for row in range(j * n, (j + 1) * n):
                keep = host.completion_mask[row]
                comp_ids[prompt].append(host.completion[row][keep])
                logps[prompt].append(host.logprobs[row][keep])
        flat = [c for prompt in idx for c in comp_ids[prompt]]
        decoded = tokenizer.batch_decode([c.tolist() for c in flat], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
        if clean_up:
            decoded = [clean_up_spaces(t) for t in decoded]
        for j, prompt in enumerate(idx):
            texts[prompt] = decoded[j * n:(j + 1) * n]
        total_tokens += int(host.lengths.sum())
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{total_tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    return Generation(texts, ids, comp_ids, logps, batches, truncated, total_tokens,
                      time.perf_counter() - start)


def generate_texts(params: Any, model_config: ModelConfig, tokenizer: Any, prompts: Sequence[str],
                   sample_config: SampleConfig, rng: jax.Array, batch_size: int = 8, mesh=None,
                   progress: bool = True, **kwargs: Any) -> list[list[str]]:
    """Completion texts [prompt][sample]; see `generate` for the options."""
    return generate(params, model_config, tokenizer, prompts, sample_config, rng, batch_size, mesh,
                    progress, **kwargs).texts


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", desc="sampling", disable=not enabled, dynamic_ncols=True)
