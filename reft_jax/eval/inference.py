"""Inference-time strategies over sample sets: voting@k, pass@k, the any-correct upper bound and
reranking (reference §7.2-§7.4), as pure functions, plus the sample-file reader at the edge.

A *sample set* is one question with its k sampled completions, each already scored (prediction
and correctness). The strategies only ever choose among the samples, so they are host-side,
deterministic and testable against plain-Python references:

* voting@k: the most common valid prediction over all k samples (duplicates counted), ties to
  the value seen first (`evaluate.majority_vote`, the one implementation);
* rerank@k: among the *unique* completions with a valid prediction (MathQA: one alphabetic
  character), the one the verifier gives the highest P(correct); ties to the first seen, exactly
  `np.argmax` in ReFT's `train_reward_model.py`;
* pass@k: the unbiased estimator of Chen et al. (2021) for k <= n; at k = n it is the any-correct
  upper bound ReFT reports next to rerank.
In every strategy, a question with no valid prediction counts as wrong.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

from reft_jax.eval.evaluate import majority_vote
from reft_jax.reward.answers import MCQ, Prediction, check_kind, is_correct, parse_gold


@dataclasses.dataclass(frozen=True)
class SampleSet:
    """One question and its k scored samples, in sample order."""

    item_id: str
    question: str
    answer_value: str
    completions: tuple[str, ...]
    predictions: tuple[Prediction, ...]
    correct: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = len(self.completions)
        if len(self.predictions) != n or len(self.correct) != n:
            raise ValueError(f"{self.item_id}: {n} completions, {len(self.predictions)} predictions, "
                             f"{len(self.correct)} correctness flags")


# ----------------------------------------------------------------------------------------------
# Selection rules (pure)
# ----------------------------------------------------------------------------------------------
def rerank_valid(prediction: Prediction, kind: str) -> bool:
    """A completion the reranker may pick: a prediction exists; MathQA: a single alphabetic
    character after strip/lower (ReFT's rerank filter, stricter than voting's length-1 rule)."""
    if prediction is None:
        return False
    if check_kind(kind) == MCQ:
        text = str(prediction).strip().lower()
        return len(text) == 1 and text.isalpha()
    return True


def unique_indices(completions: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct completion text (exact match), in
    sample order: ReFT deduplicates per question before training and scoring the verifier."""
    seen: set[str] = set()
    out = []
    for i, text in enumerate(completions):
        if text not in seen:
            seen.add(text)
            out.append(i)
    return out


def rerank_candidates(sample_set: SampleSet, kind: str) -> list[int]:
    """Indices of the unique completions the reranker chooses among."""
    return [i for i in unique_indices(sample_set.completions)
            if rerank_valid(sample_set.predictions[i], kind)]


def rerank_pick(candidates: Sequence[int], probs: Mapping[int, float] | Sequence[float]) -> int | None:
    """The candidate with the highest P(label=1) (`probs[i]` for sample index i); ties go to the
    earliest candidate (np.argmax). None when there is no candidate."""
    best, best_p = None, -math.inf
    for i in candidates:
        if probs[i] > best_p:
            best, best_p = i, probs[i]
    return best


def vote_correct(sample_set: SampleSet, kind: str) -> bool:
    """Whether the majority vote over all samples is correct (no valid vote -> wrong)."""
    vote = majority_vote(sample_set.predictions, kind)
    return is_correct(vote, parse_gold(sample_set.answer_value, kind), kind)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(sets: Sequence[SampleSet], kind: str,
              probs: Sequence[Mapping[int, float]] | None = None) -> dict[str, float]:
    """Accuracies over questions: `vote@k_accuracy`, `pass@k` (any correct = the upper bound),
    `pass@1` (mean sample accuracy), and with verifier `probs` (one {sample index: P(correct)}
    per set, covering at least its rerank candidates) `rerank@k_accuracy`. `k` is the largest
    set size."""
    n = max(len(sets), 1)
    k = max((len(s.completions) for s in sets), default=0)
    out = {
        "num_questions": len(sets),
        f"vote@{k}_accuracy": sum(vote_correct(s, kind) for s in sets) / n,
        f"pass@{k}": sum(any(s.correct) for s in sets) / n,
        "pass@1": sum(sum(s.correct) / max(len(s.correct), 1) for s in sets) / n,
    }
    if probs is not None:
        picks = [rerank_pick(rerank_candidates(s, kind), p) for s, p in zip(sets, probs, strict=True)]
        out[f"rerank@{k}_accuracy"] = sum(p is not None and s.correct[p] for s, p in zip(sets, picks)) / n
    return out


# ----------------------------------------------------------------------------------------------
# Sampling k completions per question (the device shell around the pure rules)
# ----------------------------------------------------------------------------------------------
def sample_sets(params: Any, model_config: Any, tokenizer: Any, examples: Sequence[Any], data_cfg: Any,
                sample_config: Any, rng: Any, mesh: Any, executor: Any = None, batch_size: int = 8,
                prefix: str = "rollout", show_progress: bool = False) -> list[SampleSet]:
    """`sample_config.n` scored samples per question, as ReFT's `sampling.py` makes them for
    voting, reranking and offline self-training (rollout prefix, temperature 1, top-k 50, 1024
    tokens in all: the caller's config). Completions are the texts ReFT scores."""
    from reft_jax.eval import evaluate as ev

    prefixes = ev.eval_prefixes(examples, data_cfg, prefix, tokenizer)
    generated = ev.generate_for_prefixes(params, model_config, tokenizer, prefixes, sample_config, rng,
                             ev.eval_batch_size(batch_size, mesh), mesh, show_progress, data_cfg.max_prompt_len)
    texts = [[ev.scored_text(p, g) for g in gs] for p, gs in zip(prefixes, generated)]
    return scored_sets(examples, texts, lambda t, rows: ev.score_completions(t, rows, data_cfg.dataset,
                                                                              data_cfg.engine, executor))


def scored_sets(examples: Sequence[Any], texts: Sequence[Sequence[str]],
                score: Callable[[list[str], list[Any]], list[Any]]) -> list[SampleSet]:
    """Sample sets of each example's texts, all scored in one call (P-CoT: one sandbox batch)."""
    flat = score([t for ts in texts for t in ts], [ex for ex, ts in zip(examples, texts) for _ in ts])
    out, i = [], 0
    for ex, ts in zip(examples, texts):
        scores = flat[i:i + len(ts)]
        i += len(ts)
        out.append(SampleSet(ex.item_id, ex.question, ex.answer_value, tuple(ts),
                             tuple(s.prediction for s in scores), tuple(bool(s.correct) for s in scores)))
    return out


# ----------------------------------------------------------------------------------------------
# Sample files (the edge): one JSON object per question
# ----------------------------------------------------------------------------------------------
def _completion_texts(row: dict, path: Any, where: str) -> list[str]:
    """The scored texts of a line. `reft sample` writes raw generations after a `prompt`
    (`completions`, or `completion` when n = 1): they become what ReFT scores, the text after
    the last CoT trigger of prompt + generation (P-CoT: header + body). Without a `prompt` the
    completions are taken as already in that form."""
    from reft_jax.data.sources import DataError
    from reft_jax.eval.evaluate import scored_text

    if "completions" in row:
        texts = row["completions"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError("expected a list of strings", path, where, "completions")
    elif isinstance(row.get("completion"), str):
        texts = [row["completion"]]
    else:
        raise DataError("missing (a list of completion strings)", path, where, "completions")
    if not texts:
        raise DataError("empty", path, where, "completions")
    prompt = row.get("prompt")
    if prompt is None:
        return texts
    if not isinstance(prompt, str):
        raise DataError(f"expected a string, got {type(prompt).__name__}", path, where, "prompt")
    return [scored_text(prompt, t) for t in texts]


def _question_from_prompt(prompt: Any) -> str | None:
    """The question inside a ReFT prefix `INSTRUCTION + q + COT_TRIGGER [+ header]`, if it is one."""
    from reft_jax.data.prompts import COT_TRIGGER, INSTRUCTION

    if isinstance(prompt, str) and prompt.startswith(INSTRUCTION) and COT_TRIGGER in prompt:
        return prompt[len(INSTRUCTION):prompt.index(COT_TRIGGER)]
    return None


def _labels(row: dict, n: int, path: Any, where: str) -> tuple[list, list] | None:
    """(predictions, correct) when the line carries both, else None (to be scored)."""
    from reft_jax.data.sources import DataError

    if "predictions" not in row and "correct" not in row:
        return None
    for field in ("predictions", "correct"):
        if field not in row:
            other = "correct" if field == "predictions" else "predictions"
            raise DataError(f"missing (the line has {other!r}; give both or neither)", path, where, field)
        if not isinstance(row[field], list) or len(row[field]) != n:
            raise DataError(f"expected a list of {n} items (one per completion)", path, where, field)
    preds = [p if p is None or isinstance(p, str) else float(p) for p in row["predictions"]]
    return preds, [bool(c) for c in row["correct"]]


def read_sample_file(path: str | os.PathLike, examples: Iterable[Any] | Callable[[], Iterable[Any]] = (),
                     score: Callable[[list[str], list[Any]], list[Any]] | None = None) -> list[SampleSet]:
    """Sample sets from a JSONL file, one question per line: `item_id`, `completions` (see
    `_completion_texts` for `reft sample`'s `prompt` + raw generations), `question` (else parsed
    from the ReFT `prompt`, else looked up), `answer_value` (else looked up by item_id in
    `examples`, which may be a function, called only when a line needs it), and optionally
    `predictions` + `correct` (else `score(texts, examples_repeated) -> [Score]`, e.g.
    `evaluate.score_completions` bound to a dataset and engine). Errors name file, line, field."""
    from reft_jax.data.sources import DataError, Example, read_jsonl_object, require_str

    path = pathlib.Path(path)
    lookup: dict[str, Any] | None = None

    def known(item_id: str) -> Any:
        nonlocal lookup
        if lookup is None:
            lookup = {ex.item_id: ex for ex in (examples() if callable(examples) else examples)}
        return lookup.get(item_id)

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror}", path) from None
    pending: list[tuple[SampleSet | None, Example, list[str]]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = read_jsonl_object(line, path, lineno)
        where = f"line {lineno}"
        item_id = require_str(row, "item_id", path, where)
        texts = _completion_texts(row, path, where)
        fields = {"question": _question_from_prompt(row.get("prompt"))}
        for field in ("question", "answer_value"):
            if field in row:
                fields[field] = require_str(row, field, path, where)
            elif fields.get(field) is None:
                if known(item_id) is None:
                    raise DataError(f"missing, and {item_id!r} is not in the dataset given to look it up",
                                    path, where, field)
                fields[field] = getattr(known(item_id), field)
        example = Example(item_id, fields["question"], fields["answer_value"])
        labels = _labels(row, len(texts), path, where)
        done = None if labels is None else SampleSet(item_id, example.question, example.answer_value,
                                                     tuple(texts), tuple(labels[0]), tuple(labels[1]))
        pending.append((done, example, texts))
    if not pending:
        raise DataError("no sample sets", path)
    todo = [(ex, texts) for done, ex, texts in pending if done is None]
    if todo and score is None:
        raise DataError("has no 'predictions'/'correct' and no scorer was given", path, None, "predictions")
    scored = iter(scored_sets([ex for ex, _ in todo], [texts for _, texts in todo], score) if todo else [])
    return [done if done is not None else next(scored) for done, _, _ in pending]


def load_sample_sets(path: str | os.PathLike, data: Any, split: str, stack: contextlib.ExitStack,
                     timeout: float = 10.0) -> list[SampleSet]:
    """Sample sets of a file; questions / gold answers missing from it come from the dataset's
    `split`, predictions missing from it are scored (P-CoT in a sandbox started on demand)."""
    from reft_jax.eval import evaluate as ev
    from reft_jax.data.sources import load_config_dataset

    executor: list[Any] = []

    def score(completions: list[str], rows: list) -> list:
        if data.engine == "python" and not executor:
            from reft_jax.reward.sandbox import ProgramExecutor, SandboxConfig

            executor.append(stack.enter_context(ProgramExecutor(SandboxConfig(timeout=timeout))))
        return ev.score_completions(completions, rows, data.dataset, data.engine, executor[0] if executor else None)

    return read_sample_file(path, lambda: load_config_dataset(data, split), score)


def write_sample_file(path: str | os.PathLike, sets: Sequence[SampleSet]) -> pathlib.Path:
    """The JSONL form `read_sample_file` reads back without scoring (atomic rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in sets:
            # non-finite floats are written as JSON NaN/Infinity, which Python reads back as floats
            f.write(json.dumps({"item_id": s.item_id, "question": s.question, "answer_value": s.answer_value,
                                "completions": list(s.completions), "predictions": list(s.predictions),
                                "correct": list(s.correct)}) + "\n")
    os.replace(tmp, path)
    return path
