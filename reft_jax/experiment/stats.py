"""Statistics for comparing two policies evaluated on the same test questions.

* `paired_bootstrap`: a percentile bootstrap interval of the mean difference of two per-question
  correctness vectors (both policies answered the same questions, so the questions are resampled
  together: the interval reflects which questions happen to be in the test set, not decoding
  noise or training seeds).
* `best_epoch`: the epoch a run's number is reported at when selection is on the test set (as
  the paper does), with the trainers' tie rule (`checkpoint.improves`: a tie goes to the later
  epoch).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from reft_jax.checkpoint import improves


def paired_bootstrap(a_correct: Sequence[float], b_correct: Sequence[float], n_boot: int = 10000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi): the observed mean difference and the percentile bootstrap
    `level` interval of it, from `n_boot` resamples of the question indices (with replacement,
    the same indices for both vectors). Entries are 0/1 (or booleans, or any scores)."""
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired vectors must be 1-D and of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one question")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bounded memory: at most ~2M indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(diff.mean()), float(lo), float(hi)


def best_epoch(points: Iterable[Mapping[str, Any]], key: str) -> tuple[Any, float] | None:
    """(epoch, value) of the best `key` over evaluation points (`{"epoch": e, key: value}`, e.g.
    `eval.report.eval_points` of a metrics.jsonl). Points are taken in epoch order; a value
    takes over when `checkpoint.improves` says so, so ties go to the later epoch, as the trainers
    keep their `best` checkpoint. NaN, missing values and points without an epoch are skipped;
    a re-evaluated epoch (a resumed run) keeps its last record. None when nothing qualifies."""
    by_epoch: dict[Any, float] = {}
    for p in points:
        value, epoch = p.get(key), p.get("epoch")
        if epoch is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isnan(float(value)):
            continue
        by_epoch[epoch] = float(value)
    best: tuple[Any, float] | None = None
    for epoch in sorted(by_epoch):
        if best is None or improves(by_epoch[epoch], best[1]):
            best = (epoch, by_epoch[epoch])
    return best
