"""Token batches: padding, length buckets and a deterministic, resumable epoch order.

Everything here is host-side NumPy. A data position is just `(epoch, batch_index)`: the order
of an epoch is a pure function of `(seed, epoch)`, so a resumed run replays the exact batches.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np

LastBatch = Literal["short", "drop", "fill"]  # a last partial batch: see epoch_batches


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised training example: prompt ids followed by target ids (EOS included)."""

    ids: np.ndarray  # int32 [n]
    n_prompt: int  # the first n_prompt ids are the prompt (masked from the loss)


def bucket_sizes(bucket: int, cap: int) -> list[int]:
    """The fixed set of padded lengths a run uses: `bucket` x (1, 2, 3, 4, 6, 8, 12, 16, ...)
    below `cap`, then `cap`. Each compiled program exists once per size, so a run compiles a
    handful of shapes (about two per doubling); beyond two buckets a padded row is at most 1.5x
    its length."""
    sizes, m = [], 1
    while bucket * m < cap:
        sizes.append(bucket * m)
        m = m + 1 if m < 4 else (m * 3 // 2 if m & (m - 1) == 0 else m * 4 // 3)
    return sizes + [cap]


def bucket_length(n: int, bucket: int, cap: int) -> int:
    """The smallest of `bucket_sizes(bucket, cap)` that holds `n` (at most `cap`)."""
    if n >= cap:
        return max(1, cap)
    return next(size for size in bucket_sizes(bucket, cap) if size >= max(n, 1))


def pad_sft_batch(items: Sequence[Encoded], length: int, pad_id: int, batch_size: int) -> dict[str, np.ndarray]:
    """Right-padded SFT batch.

    `loss_weights[b, t] = 1` when position t predicts a target token (t+1 is a target), so the
    token-mean loss is `sum(w * nll) / sum(w)`. Rows beyond `len(items)` are all-padding dummies
    with zero weight: they keep shapes static (and divisible by the mesh) without changing the loss.
    Examples longer than `length` keep their head (as ReFT truncates).
    """
    if len(items) > batch_size:
        raise ValueError(f"{len(items)} examples do not fit a batch of {batch_size}")
    tokens = np.full((batch_size, length), pad_id, np.int32)
    attn = np.zeros((batch_size, length), bool)
    weights = np.zeros((batch_size, length), np.float32)
    for i, item in enumerate(items):
        n = min(len(item.ids), length)
        tokens[i, :n] = item.ids[:n]
        attn[i, :n] = True
        if item.n_prompt < n:
            weights[i, max(item.n_prompt - 1, 0): n - 1] = 1.0
    return {"tokens": tokens, "attention_mask": attn, "loss_weights": weights}


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int, batch_size: int | None = None):
    """Left-padded prefixes for generation: (tokens int32 [B, length], mask bool [B, length])."""
    batch_size = batch_size or len(seqs)
    tokens = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for i, s in enumerate(seqs):
        s = list(s)[-length:] if len(s) > length else list(s)
        if s:
            tokens[i, length - len(s):] = s
            mask[i, length - len(s):] = True
    return tokens, mask


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  last: LastBatch = "short") -> list[np.ndarray]:
    """Index arrays of each batch in one epoch. A last partial batch is kept short (``short``),
    dropped (``drop``), or completed with the epoch's first indices (``fill``): what
    accelerate's DataLoader does with ``even_batches`` (the official RL runs on 8 GPUs), and
    what keeps every batch one shape."""
    order = epoch_permutation(n, seed, epoch, shuffle)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if out and len(out[-1]) < batch_size:
        if last == "drop":
            out.pop()
        elif last == "fill":
            out[-1] = np.concatenate([out[-1], np.resize(order, batch_size - len(out[-1]))])
    return out


def steps_per_epoch(n: int, batch_size: int, last: LastBatch = "short") -> int:
    return n // batch_size if last == "drop" else int(math.ceil(n / batch_size))
